"""The action's image, run the way GitHub's runner runs a container action (tests/container.py): a
failing smoke test, a bad input, a cancelled job, and the image pulled from a registry into an engine that
never had it. The release the other tests read is published by the image too: tests/test_release.py."""

from __future__ import annotations

import json
import os
import shutil
import threading

import docker
import pytest

from tests import fault_report, servers
from tests.conftest import HF_REPO, SMOKE_PROMPT, key_lines, make_ollama_key, parse_outputs, registry_tags
from tests.container import IMAGE, Runner, secrets_left

pytestmark = pytest.mark.servers
HF_TOKEN = "hf_ContainerTokenThatMustNeverBeLogged987654321"
OWNER = (1001, 1001)  # the runner user's uid and gid on GitHub's hosted runners


def _inputs(stack, repository: str, **extra: str) -> dict[str, str]:
    return {"hf-repo": HF_REPO, "hf-revision": "v1.0.0", "ollama-model": f"{stack.registry}/{repository}",
            "insecure-registry": "true", "smoke-test-prompt": SMOKE_PROMPT, **extra}


def _secrets(key: str) -> list[str]:
    return [HF_TOKEN, *key_lines(key)]


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> str:
    return make_ollama_key(tmp_path_factory.mktemp("container-key"))


def test_a_failing_smoke_test_pushes_nothing(stack, tmp_path):
    run = Runner(tmp_path).run(_inputs(stack, "container/smoke-fails", quantizations="Q8_0",
                                       parameters="num_predict 3"), env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.exit_code == 1
    assert len(run.errors()) == 1 and "Smoke test failed" in run.errors()[0]
    assert "6. Push" not in run.stdout
    assert registry_tags(stack.registry, "container/smoke-fails") == []
    assert "## ollama-publish failed" in run.summary
    # Where the README says what to do: the link in the error and the summary.
    assert run.errors()[0].endswith("%0AMore: README.md#smoke-test-failed")
    assert "More: [smoke-test-failed](README.md#smoke-test-failed)" in run.summary


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
    assert secrets_left(run, _secrets(key)) == []
    assert fault_report.assert_all_or_nothing(stack.registry, "container/cancelled",
                                              {"1.0.0-q8_0", "1.0.0", "latest"}) == set()


def test_the_image_pulled_from_a_registry_publishes(stack, tmp_path, ready_gguf):
    """The prebuilt path: the image pushed to a registry, pulled by an engine that never had it (as a
    hosted runner's is at the start of a job), and a release published from it (ready GGUF files in the
    checkout: model-path)."""
    local = docker.DockerClient(base_url=os.environ["DOCKER_HOST"], timeout=1800)
    with servers.docker_engine(tmp_path / "engine") as engine:
        fresh = docker.DockerClient(base_url=engine, timeout=1800)
        assert fresh.images.list() == []
        # A registry of its own, deleted once the image is pulled: the image takes GBs there.
        with servers.registry(tmp_path / "image-registry") as image_registry:
            remote = f"{image_registry}/ollama-publish/action:test"
            local.images.get(IMAGE).tag(remote)
            try:
                for line in local.images.push(remote, stream=True, decode=True):
                    assert "error" not in line, line
            finally:
                local.images.remove(remote)
            fresh.images.pull(remote)
        shutil.rmtree(tmp_path / "image-registry")
        runner = Runner(tmp_path / "runner", image=remote, docker_host=engine)
        shutil.copytree(ready_gguf, runner.workspace / "model")  # converting is not the subject here
        run = runner.run({"model-path": "model", "ollama-model": f"{stack.registry}/container/pulled",
                          "quantizations": "Q8_0", "insecure-registry": "true", "smoke-test-prompt": SMOKE_PROMPT})
    assert run.exit_code == 0, run.stdout[-3000:]
    models = json.loads(parse_outputs(run.outputs_text)["models"])
    assert all(m["pushed"] and m["pulled"] and "Berlin" in m["answer"] for m in models), models
    assert sorted(registry_tags(stack.registry, "container/pulled")) == ["1.0.0", "1.0.0-q8_0", "latest"]
