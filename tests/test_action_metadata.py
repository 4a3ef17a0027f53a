"""action.yml and the Dockerfile agree with the code: same inputs, defaults, outputs; pinned images."""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from entrypoint.settings import INPUTS, SECRET_INPUTS
from tests import servers

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
    assert "env" not in choose and "${{" not in choose["run"]  # no input, so no secret, reaches it
    assert publish["id"] == "publish" and publish["uses"] == "./" + str(SELECT_IMAGE["GENERATED"].parent)
    assert publish["with"] == {name: f"${{{{ inputs.{name} }}}}" for name in INPUTS}


SELECT_IMAGE = runpy.run_path(str(ROOT / "scripts" / "select-image"))  # the script's globals


@pytest.mark.parametrize("ref, repository, image", [
    ("v1", "Owner/Ollama-Publish", "ghcr.io/owner/ollama-publish:1"),
    ("v1.2", "owner/ollama-publish", "ghcr.io/owner/ollama-publish:1.2"),
    ("v1.2.3", "owner/ollama-publish", "ghcr.io/owner/ollama-publish:1.2.3"),
    ("0123456789abcdef0123456789abcdef01234567", "owner/ollama-publish",
     "ghcr.io/owner/ollama-publish:sha-0123456789abcdef0123456789abcdef01234567"),
    ("main", "owner/ollama-publish", ""),
    ("v1.2.3-rc1", "owner/ollama-publish", ""),
    ("", "", ""),  # `uses: ./` in this repository
])
def test_released_refs_name_the_prebuilt_image(ref, repository, image):
    assert SELECT_IMAGE["released_image"](ref, repository) == image


@pytest.mark.parametrize("action_path, checked_out", [
    ("/home/runner/work/_actions/owner/ollama-publish/v1", ("owner/ollama-publish", "v1")),
    ("/home/runner/work/_actions/owner/ollama-publish/v1.2.3/", ("owner/ollama-publish", "v1.2.3")),
    # Used by another composite action: github.action_ref would be the outer action's; the path is ours.
    ("/home/runner/work/_actions/owner/ollama-publish/0123456789abcdef0123456789abcdef01234567",
     ("owner/ollama-publish", "0123456789abcdef0123456789abcdef01234567")),
    ("/home/runner/work/model-repo/model-repo", ("", "")),  # uses: ./
])
def test_the_ref_is_where_the_runner_checked_the_action_out(action_path, checked_out):
    assert SELECT_IMAGE["checked_out_as"](action_path) == checked_out


def test_a_ref_without_an_image_builds_the_dockerfile_and_says_why():
    dockerfile = str(ROOT / "Dockerfile")
    choose = SELECT_IMAGE["choose"]
    assert choose("v1", "owner/ollama-publish", exists=lambda image: True) == (
        "docker://ghcr.io/owner/ollama-publish:1", "")
    image, warning = choose("0123456789abcdef0123456789abcdef01234567", "owner/ollama-publish",
                            exists=lambda image: False)
    assert image == dockerfile and "is not a release of owner/ollama-publish" in warning and "@v1" in warning
    image, warning = choose("v1", "owner/ollama-publish", exists=lambda image: None)  # the registry did not say
    assert image == "docker://ghcr.io/owner/ollama-publish:1" and "Could not check" in warning
    assert choose("main", "owner/ollama-publish", exists=lambda image: pytest.fail("asked")) == (dockerfile, "")


def test_the_written_action_declares_every_input(tmp_path):
    """Run as the runner runs it, for a branch (no registry is asked): the Dockerfile, every input, and
    the README at that ref for the error messages' links."""
    action_path = tmp_path / "_actions" / "owner" / "ollama-publish" / "main"
    env = {**os.environ, "GITHUB_ACTION_PATH": str(action_path), "GITHUB_WORKSPACE": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "select-image")], env=env, capture_output=True,
                            text=True, check=True)
    assert str(ROOT / "Dockerfile") in result.stdout and "::warning" not in result.stdout
    written = yaml.safe_load((tmp_path / SELECT_IMAGE["GENERATED"]).read_text())
    assert written["runs"] == {"using": "docker", "image": str(ROOT / "Dockerfile"), "env": {
        "OLLAMA_PUBLISH_README": "https://github.com/owner/ollama-publish/blob/main/README.md"}}
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


def _push_tiny_image(registry: str, repository: str, tag: str) -> None:
    """A manifest with a config and no layers, through the registry's own API."""
    config = b'{"architecture": "amd64", "os": "linux"}'
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    upload = requests.post(f"http://{registry}/v2/{repository}/blobs/uploads/", timeout=10)
    location = upload.headers["Location"]
    requests.put(f"{location}&digest={digest}", data=config, timeout=10).raise_for_status()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(config),
                           "digest": digest}, "layers": []}
    requests.put(f"http://{registry}/v2/{repository}/manifests/{tag}", data=json.dumps(manifest), timeout=10,
                 headers={"Content-Type": manifest["mediaType"]}).raise_for_status()


@pytest.mark.servers
def test_whether_the_registry_has_the_image_is_asked_of_the_registry(stack):
    """Against docker-registry (ghcr.io cannot be reached from here: its anonymous-token step is not run)."""
    _push_tiny_image(stack.registry, "owner/ollama-publish", "1.2.3")
    exists = SELECT_IMAGE["image_exists"]
    assert exists(f"{stack.registry}/owner/ollama-publish:1.2.3", scheme="http") is True
    assert exists(f"{stack.registry}/owner/ollama-publish:sha-{'0' * 40}", scheme="http") is False
    assert exists(f"127.0.0.1:{servers.free_port()}/owner/ollama-publish:1", scheme="http", timeout=5) is None


# Names that tie a build step to one CPU architecture.
_ARCH_SPECIFIC = re.compile(r"x86|x64|amd64|arm64|aarch64|armv\d|sapphirerapids|avx|haswell|skylake", re.IGNORECASE)


def test_every_architecture_specific_step_of_the_dockerfile_is_guarded():
    """The image builds on amd64 and arm64 runners: outside comments, every architecture name in the
    Dockerfile sits in the one `case "$(dpkg --print-architecture)"` that chooses per architecture, and
    that case knows both (and fails on any other)."""
    code = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    guards = list(re.finditer(r'case "\$\(dpkg --print-architecture\)" in(.*?)esac', code, re.DOTALL))
    assert len(guards) == 1
    outside = code[:guards[0].start()] + code[guards[0].end():]
    assert _ARCH_SPECIFIC.findall(outside) == []
    branches = re.findall(r"^\s*([\w*]+)\)", guards[0].group(1), re.MULTILINE)
    assert branches == ["amd64", "arm64", "*"]


def test_releases_and_the_action_job_run_on_both_architectures():
    release = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    built = {entry["arch"]: entry["runner"] for entry in release["jobs"]["image"]["strategy"]["matrix"]["include"]}
    assert built == {"amd64": "ubuntu-24.04", "arm64": "ubuntu-24.04-arm"}
    joined = next(step["run"] for step in release["jobs"]["publish"]["steps"] if "imagetools" in step.get("run", ""))
    assert all(f"sha-$COMMIT-{arch}" in joined for arch in built)
    tests = yaml.safe_load((ROOT / ".github" / "workflows" / "test.yml").read_text())
    assert tests["jobs"]["action"]["strategy"]["matrix"]["runner"] == list(built.values())
    assert any(step.get("uses") == "./" for step in tests["jobs"]["action"]["steps"])
