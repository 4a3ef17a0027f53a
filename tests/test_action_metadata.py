"""action.yml and the Dockerfile agree with the code: same inputs, defaults, outputs; pinned images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from entrypoint.settings import INPUTS, SECRET_INPUTS

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = {"models", "modelfile", "gguf-paths", "revision"}


@pytest.fixture(scope="module")
def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))


def test_inputs_match_settings_in_order(action):
    assert list(action["inputs"]) == list(INPUTS)


@pytest.mark.parametrize("name", list(INPUTS))
def test_input_default_matches_settings(action, name):
    spec = action["inputs"][name]
    default = spec.get("default", "")
    # YAML would turn an unquoted true/false into a bool; GitHub passes inputs as strings.
    assert isinstance(default, str), f"{name}: quote the default so it stays a string"
    assert default == INPUTS[name]
    if INPUTS[name] == "":
        assert "default" not in spec, f"{name}: omit an empty default"


@pytest.mark.parametrize("name", list(INPUTS))
def test_input_is_described_and_optional(action, name):
    spec = action["inputs"][name]
    assert isinstance(spec.get("description"), str) and spec["description"].strip()
    assert spec.get("required") is False  # hf-repo and ollama-model are validated in code


@pytest.mark.parametrize("name", SECRET_INPUTS)
def test_secret_inputs_have_no_default(action, name):
    assert "default" not in action["inputs"][name]


def test_outputs(action):
    assert set(action["outputs"]) == OUTPUTS
    for name, spec in action["outputs"].items():
        assert spec.get("description", "").strip(), name


def test_runs_the_dockerfile(action):
    assert action["runs"] == {"using": "docker", "image": "Dockerfile"}


def _from_images(dockerfile: str) -> list[tuple[str, str | None]]:
    """(image, stage alias) for each FROM, with --platform and similar flags skipped and ${ARG}s replaced
    by their defaults."""
    images, defaults = [], {}
    for line in dockerfile.splitlines():
        words = line.split()
        if words and words[0].upper() == "ARG" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            defaults.setdefault(name, value)
        if not words or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        alias = args[2] if len(args) >= 3 and args[1].upper() == "AS" else None
        images.append((re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], args[0]), alias))
    return images


def test_dockerfile_base_images_are_pinned():
    images = _from_images((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    assert images, "no FROM line"
    stages = {alias for _, alias in images if alias}
    for image, _ in images:
        if image in stages:  # FROM an earlier stage
            continue
        name, _, digest = image.partition("@")
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
            continue
        last = name.rsplit("/", 1)[-1]  # a registry host may carry a :port
        assert ":" in last, f"{image} has no tag"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest", f"{image} is not pinned"
