"""The action's image, run the way GitHub's runner runs a container action (tests/container.py): a
release, a failing smoke test, a bad input, a cancelled job, what the container leaves in the runner's
folders (owner, secrets), and the image pulled from a registry into an engine that never had it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import docker
import pytest

from entrypoint.ollama import file_sha256
from entrypoint.quantize import tag_suffix
from tests import fault_report, servers
from tests.conftest import HF_REPO, SMOKE_PROMPT, parse_outputs, registry_manifest, registry_tags
from tests.container import IMAGE, Runner
from tests.test_publish import make_ollama_key

pytestmark = pytest.mark.servers
HF_TOKEN = "hf_ContainerTokenThatMustNeverBeLogged987654321"
OWNER = (1001, 1001)  # the runner user's uid and gid on GitHub's hosted runners
QUANTIZATIONS = ("Q4_K_M", "Q8_0")


def _inputs(stack, repository: str, **extra: str) -> dict[str, str]:
    return {"hf-repo": HF_REPO, "hf-revision": "v1.0.0", "ollama-model": f"{stack.registry}/{repository}",
            "insecure-registry": "true", "smoke-test-prompt": SMOKE_PROMPT, **extra}


def _secrets(key: str) -> list[str]:
    return [HF_TOKEN] + [line for line in key.splitlines() if len(line) > 20 and "-----" not in line]


def _leaks(run, secrets: list[str]) -> list[str]:
    """Where any secret shows: stdout (the ::add-mask:: lines GitHub swallows aside), stderr, and every
    file the container left in the mounted folders."""
    places = {"stdout": "\n".join(line for line in run.stdout.splitlines() if not line.startswith("::add-mask::")),
              "stderr": run.stderr}
    for folder in run.mounted:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                places[str(path)] = path.read_bytes().decode("latin-1")
    return [f"{secret[:8]}... in {where}" for secret in secrets for where, text in places.items() if secret in text]


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> str:
    return make_ollama_key(tmp_path_factory.mktemp("container-key"))


@pytest.fixture(scope="module")
def release(stack, tmp_path_factory, key):
    """Release v1.0.0 with Q4_K_M and Q8_0, from the image, into a checkout owned by the runner's user."""
    run = Runner(tmp_path_factory.mktemp("container-release"), workspace_owner=OWNER).run(
        _inputs(stack, "container/smollm2", quantizations=", ".join(QUANTIZATIONS), **{"hf-token": HF_TOKEN},
                **{"ollama-key": key}), env={"HF_ENDPOINT": stack.hub_endpoint})
    print(run.stdout[-4000:], run.stderr[-2000:])
    return run


def test_the_container_publishes_the_release(release, stack):
    assert release.exit_code == 0, release.stdout[-3000:] + release.stderr[-2000:]
    assert release.errors() == []
    outputs = parse_outputs(release.outputs_text)
    models = json.loads(outputs["models"])
    assert [(m["tag"], m["quantization"]) for m in models] == [
        ("1.0.0-q4_K_M", "Q4_K_M"), ("1.0.0-q8_0", "Q8_0"), ("1.0.0", "Q4_K_M"), ("latest", "Q4_K_M")]
    assert all(m["pushed"] and m["pulled"] and "Berlin" in m["answer"] for m in models), models
    assert sorted(registry_tags(stack.registry, "container/smollm2")) == sorted(m["tag"] for m in models)
    # The outputs name paths in the checkout, as later steps on the runner see them.
    ggufs = {Path(p).name: release.workspace / p for p in outputs["gguf-paths"].splitlines()}
    assert sorted(ggufs) == [f"smollm2-{tag_suffix(q)}.gguf" for q in QUANTIZATIONS]
    for model in models:
        digest, manifest = registry_manifest(stack.registry, "container/smollm2", model["tag"])
        assert digest == model["registry_digest"]
        layers = {layer["mediaType"]: layer["digest"] for layer in manifest["layers"]}
        gguf = ggufs[f"smollm2-{tag_suffix(model['quantization'])}.gguf"]
        assert layers["application/vnd.ollama.image.model"] == "sha256:" + file_sha256(gguf)
    assert (release.workspace / outputs["modelfile"]).read_text().startswith("# Modelfile written by ollama-publish")
    assert "Ollama 0.34.3." in release.summary
    assert release.summary.count("| yes, pulled back by an empty Ollama |") == len(models)


def test_no_secret_is_left_anywhere(release, key):
    assert f"::add-mask::{HF_TOKEN}" in release.stdout
    assert _leaks(release, _secrets(key)) == []
    assert not list(release.home.rglob("id_ed25519*"))  # the server's key lived in the scratch space


def test_files_left_in_the_checkout_belong_to_its_owner(release):
    """Later steps run as the runner's user: what the container (root) wrote must be theirs to delete."""
    left = [path for path in release.workspace.rglob("*")]
    assert left, "the container wrote nothing into the checkout"
    assert [p for p in left if (p.lstat().st_uid, p.lstat().st_gid) != OWNER] == []

    def as_runner_user():
        os.setgid(OWNER[1])
        os.setuid(OWNER[0])

    output_dir = release.workspace / "ollama-publish-out"
    subprocess.run(["rm", "-r", str(output_dir)], preexec_fn=as_runner_user, check=True)
    assert not output_dir.exists()


def test_a_failing_smoke_test_pushes_nothing(stack, tmp_path):
    run = Runner(tmp_path).run(_inputs(stack, "container/smoke-fails", quantizations="Q8_0",
                                       parameters="num_predict 3"), env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.exit_code == 1
    assert len(run.errors()) == 1 and "Smoke test failed" in run.errors()[0]
    assert "6. Push" not in run.stdout
    assert registry_tags(stack.registry, "container/smoke-fails") == []
    assert "## ollama-publish failed" in run.summary


def test_a_bad_input_is_one_error(stack, tmp_path):
    run = Runner(tmp_path).run(_inputs(stack, "container/bad", **{"ollama-model": "Team/Model:v1"}))
    assert run.exit_code == 1
    assert len(run.errors()) == 1 and "ollama-model" in run.errors()[0] and "tag" in run.errors()[0]
    assert run.outputs_text == ""
    fault_report.bad_input_refused()


def test_docker_stop_during_conversion_cleans_up(stack, tmp_path, key):
    """`docker stop` sends the container SIGTERM (a cancelled job): the action stops its tools and server,
    removes its scratch space and the key, leaves no GGUF that looks finished, pushes nothing, and exits
    143 before docker's grace period would make it a SIGKILL (137)."""
    stopping: list[threading.Thread] = []

    def stop_during_conversion(line, container):
        if line.startswith("$ ") and "convert_hf_to_gguf.py" in line and not stopping:
            stopping.append(threading.Thread(target=container.stop, kwargs={"timeout": 60}))
            stopping[0].start()
            fault_report.fault_injected()

    run = Runner(tmp_path, workspace_owner=OWNER).run(
        _inputs(stack, "container/cancelled", quantizations="Q8_0", **{"hf-token": HF_TOKEN}, **{"ollama-key": key}),
        env={"HF_ENDPOINT": stack.hub_endpoint}, on_line=stop_during_conversion)
    assert stopping, "the converter never started"
    stopping[0].join(timeout=90)
    assert run.exit_code == 143, run.stdout[-2000:]
    output_dir = run.workspace / "ollama-publish-out"
    assert list(output_dir.glob(".ollama-publish-*")) == []  # the scratch space, with the server's HOME and key
    assert list(output_dir.glob("*.gguf*")) == []
    assert not list(run.home.rglob("id_ed25519*"))
    assert _leaks(run, _secrets(key)) == []
    assert fault_report.assert_all_or_nothing(stack.registry, "container/cancelled",
                                              {"1.0.0-q8_0", "1.0.0", "latest"}) == set()


def test_the_image_pulled_from_a_registry_publishes(stack, tmp_path):
    """The prebuilt path: the image pushed to a registry, pulled by an engine that never had it (as a
    hosted runner's is at the start of a job), and the release published from it."""
    local = docker.DockerClient(base_url=os.environ["DOCKER_HOST"], timeout=1800)
    remote = f"{stack.registry}/ollama-publish/action:test"
    local.images.get(IMAGE).tag(remote)
    try:
        for line in local.images.push(remote, stream=True, decode=True):
            assert "error" not in line, line
    finally:
        local.images.remove(remote)
    with servers.docker_engine(tmp_path / "engine") as engine:
        fresh = docker.DockerClient(base_url=engine, timeout=1800)
        assert fresh.images.list() == []
        fresh.images.pull(remote)
        run = Runner(tmp_path / "runner", image=remote, docker_host=engine).run(
            _inputs(stack, "container/pulled", quantizations="Q8_0"), env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.exit_code == 0, run.stdout[-3000:]
    models = json.loads(parse_outputs(run.outputs_text)["models"])
    assert all(m["pushed"] and m["pulled"] and "Berlin" in m["answer"] for m in models), models
    assert sorted(registry_tags(stack.registry, "container/pulled")) == ["1.0.0", "1.0.0-q8_0", "latest"]
