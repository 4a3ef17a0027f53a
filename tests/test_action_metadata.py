"""action.yml and the Dockerfile agree with the code: same inputs, defaults, outputs; pinned images."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
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
        assert spec["value"] == f"${{{{ steps.publish.outputs.{name} }}}}"


def test_runs_the_chosen_image_with_every_input(action):
    """A composite action: select-image writes the docker action, the next step runs it with every input."""
    assert action["runs"]["using"] == "composite"
    choose, publish = action["runs"]["steps"]
    assert choose["run"] == 'python3 "$GITHUB_ACTION_PATH/scripts/select-image"'
    assert set(choose["env"]) == {"ACTION_REF", "ACTION_REPOSITORY"}  # no input, so no secret, reaches it
    assert publish["id"] == "publish" and publish["uses"] == "./" + str(SELECT_IMAGE["GENERATED"].parent)
    assert publish["with"] == {name: f"${{{{ inputs.{name} }}}}" for name in INPUTS}


SELECT_IMAGE = runpy.run_path(str(ROOT / "scripts" / "select-image"))  # the script's globals


@pytest.mark.parametrize("ref, repository, image", [
    ("v1", "Owner/Ollama-Publish", "docker://ghcr.io/owner/ollama-publish:1"),
    ("v1.2", "owner/ollama-publish", "docker://ghcr.io/owner/ollama-publish:1.2"),
    ("v1.2.3", "owner/ollama-publish", "docker://ghcr.io/owner/ollama-publish:1.2.3"),
    ("0123456789abcdef0123456789abcdef01234567", "owner/ollama-publish",
     "docker://ghcr.io/owner/ollama-publish:sha-0123456789abcdef0123456789abcdef01234567"),
    ("main", "owner/ollama-publish", str(ROOT / "Dockerfile")),
    ("v1.2.3-rc1", "owner/ollama-publish", str(ROOT / "Dockerfile")),
    ("", "", str(ROOT / "Dockerfile")),  # `uses: ./` in this repository
])
def test_released_refs_run_the_prebuilt_image(ref, repository, image):
    assert SELECT_IMAGE["image"](ref, repository) == image


def test_the_written_action_declares_every_input(tmp_path):
    env = {**os.environ, "ACTION_REF": "v2.0.1", "ACTION_REPOSITORY": "owner/ollama-publish",
           "GITHUB_WORKSPACE": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "select-image")], env=env, capture_output=True,
                            text=True, check=True)
    assert "docker://ghcr.io/owner/ollama-publish:2.0.1" in result.stdout
    written = yaml.safe_load((tmp_path / SELECT_IMAGE["GENERATED"]).read_text())
    # The README at the same ref, for the links in error messages.
    assert written["runs"] == {"using": "docker", "image": "docker://ghcr.io/owner/ollama-publish:2.0.1", "env": {
        "OLLAMA_PUBLISH_README": "https://github.com/owner/ollama-publish/blob/v2.0.1/README.md"}}
    assert list(written["inputs"]) == list(INPUTS)


def test_uses_dot_slash_sets_no_readme_address():
    assert SELECT_IMAGE["readme_env"]("", "") == {}


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
