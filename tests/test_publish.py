"""End to end on the host, against real servers (olah as the Hub, docker-registry as the registry, Ollama and
llama.cpp's tools from the image, the real SmolLM2-135M-Instruct): the CLI, what stops a release before
the push, and re-runs. The release every other test reads is published by the image: tests/test_release.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import servers
from tests.conftest import (HF_REPO, REPO_ROOT, SMOKE_PROMPT, action_runner, make_ollama_key, registry_manifest,
                            registry_tags)

pytestmark = pytest.mark.servers
TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "chat"


def test_the_cli_leaves_the_users_own_ollama_identity_alone(stack, tmp_path):
    """Run as a CLI (flags, no GitHub variables) by someone whose ~/.ollama holds their own key: the push is
    signed with ollama-key by the action's private server, and their folder is byte for byte as before."""
    home, workdir = tmp_path / "home", tmp_path / "work"
    (home / ".ollama").mkdir(parents=True)
    workdir.mkdir()
    own_key = make_ollama_key(home / ".ollama")
    (home / ".ollama" / "key").rename(home / ".ollama" / "id_ed25519")
    (home / ".ollama" / "key.pub").rename(home / ".ollama" / "id_ed25519.pub")
    before = {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}
    push_key = make_ollama_key(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "INPUT_", "RUNNER_"))}
    env.update({"HOME": str(home), "HF_ENDPOINT": stack.hub_endpoint, "HF_HOME": str(tmp_path / "hf"),
                "OLLAMA_HOST": f"127.0.0.1:{servers.free_port()}", "PYTHONPATH": str(REPO_ROOT),
                "INPUT_OLLAMA-KEY": push_key})  # a secret is better not passed as a flag
    run = subprocess.run([sys.executable, "-m", "entrypoint", "--hf-repo", HF_REPO, "--quantizations", "Q8_0",
                          "--ollama-model", f"{stack.registry}/cli/smollm2", "--insecure-registry", "true",
                          "--smoke-test-prompt", SMOKE_PROMPT], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "latest" in registry_tags(stack.registry, "cli/smollm2")
    after = {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert after == before  # the same files, the same bytes: nothing added, changed or removed
    assert own_key == (home / ".ollama" / "id_ed25519").read_text()


def test_failing_smoke_test_pushes_nothing(stack, run_action):
    run = run_action({
        "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/test-team/smoke-fails", "quantizations": "Q8_0",
        "insecure-registry": "true", "parameters": "num_predict 3",
    }, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1
    assert len(run.errors()) == 1 and "did not stop by itself" in run.errors()[0]
    assert "num_predict" in run.errors()[0]
    assert "6. Push" not in run.stdout
    assert registry_tags(stack.registry, "test-team/smoke-fails") == []
    assert "ollama-publish failed" in run.summary


def test_smoke_test_warn_publishes_a_model_that_fails_it_and_says_so(stack, run_action, ready_gguf):
    """smoke-test: warn: the same failure (num_predict 3 stops every answer early) is a warning, before the
    push and again after the pull-back, and the release is published."""
    repository = "test-team/smoke-warns"
    run = run_action({"model-path": str(ready_gguf), "ollama-model": f"{stack.registry}/{repository}",
                      "quantizations": "Q8_0", "insecure-registry": "true", "parameters": "num_predict 3",
                      "smoke-test": "warn"})
    assert run.returncode == 0, run.stdout[-3000:]
    warned = [line for line in run.stdout.splitlines() if line.startswith("::warning")
              and "did not stop by itself" in line and "(smoke-test: warn, so the run goes on)" in line]
    assert len(warned) == 2, run.stdout[-3000:]  # the created model, and the one pulled back
    models = json.loads(run.outputs["models"])
    assert all(m["pushed"] and m["pulled"] and m["answer"] == "smoke test failed (see the warning)"
               for m in models), models
    assert sorted(registry_tags(stack.registry, repository)) == ["1.0.0", "1.0.0-q8_0", "latest"]


@pytest.mark.parametrize("template", ["llama3", "zephyr-file"])
def test_wrong_template_fails_prompt_parity_and_pushes_nothing(stack, run_action, template):
    """A ChatML model given another family's template, from the catalog or from a file in the workspace."""
    if template == "zephyr-file":
        (run_action.workspace / "zephyr.gotmpl").write_text((TEMPLATES / "zephyr.gotmpl").read_text())
        template, marker = "zephyr.gotmpl", "<|user|>"
    else:
        marker = "<|start_header_id|>user<|end_header_id|>"
    repository = f"test-team/wrong-template-{template.split('.')[0]}"
    run = run_action({
        "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/{repository}", "quantizations": "Q8_0",
        "insecure-registry": "true", "template": template,
    }, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1
    assert len(run.errors()) == 1 and "Prompt parity failed" in run.errors()[0]
    assert "4 failed checks (user, system + user, multi-turn, system + multi-turn)" in run.errors()[0]
    assert marker in run.errors()[0] and "<|im_start|>user" in run.errors()[0]  # both renderings shown
    assert "6. Push" not in run.stdout
    assert registry_tags(stack.registry, repository) == []


def test_rerun_is_a_no_op_and_published_versions_are_immutable(stack, run_action, tmp_path, ready_gguf):
    """Same release twice: nothing pushed again. Different content under the same version: refused
    before any push, unless overwrite is set; latest moves with it. (From a folder of ready GGUF files:
    model-path.)"""
    inputs = {"model-path": str(ready_gguf), "ollama-model": f"{stack.registry}/test-team/immutable",
              "quantizations": "Q8_0", "insecure-registry": "true", "prompt-parity": "warn"}
    env: dict[str, str] = {}
    first = run_action(inputs, env=env)
    assert first.returncode == 0, first.stdout[-2000:]
    before = {m["tag"]: m["registry_digest"] for m in json.loads(first.outputs["models"])}

    again = action_runner(tmp_path / "again")(inputs, env=env)
    assert again.returncode == 0, again.stdout[-2000:]
    skipped = [line.split()[0] for line in again.stdout.splitlines()
               if "already published with the same layers" in line]
    assert sorted(skipped) == sorted(m["name"] for m in json.loads(again.outputs["models"]))
    assert not any(line.startswith("pushing ") for line in again.stdout.splitlines())
    assert {m["tag"]: m["registry_digest"] for m in json.loads(again.outputs["models"])} == before

    changed = {**inputs, "system": "You are a pirate."}
    refused = action_runner(tmp_path / "changed")(changed, env=env)
    assert refused.returncode == 1
    assert len(refused.errors()) == 1 and "immutable" in refused.errors()[0] and "overwrite" in refused.errors()[0]
    assert not any(line.startswith("pushing ") for line in refused.stdout.splitlines())
    assert {t: registry_manifest(stack.registry, "test-team/immutable", t)[0] for t in before} == before

    replaced = action_runner(tmp_path / "overwrite")({**changed, "overwrite": "true"}, env=env)
    assert replaced.returncode == 0, replaced.stdout[-2000:]
    after = {m["tag"]: m["registry_digest"] for m in json.loads(replaced.outputs["models"])}
    assert set(after) == set(before) and all(after[t] != before[t] for t in before)


def test_registry_down_during_push_is_retried(stack, run_action, tmp_path, ready_gguf):
    """The registry stops as the first push starts and is back two seconds later: the push is retried
    (logged as a warning) and the release completes."""
    root, address = tmp_path / "flaky-registry", f"127.0.0.1:{servers.free_port()}"
    state: dict = {"server": servers.registry(root, address)}
    state["server"].__enter__()

    def stop_then_restart(line, process, env):
        if line.startswith("pushing ") and "stopped" not in state:
            state["stopped"] = True
            state["server"].__exit__(None, None, None)

            def restart():
                time.sleep(2)
                state["server"] = servers.registry(root, address)
                state["server"].__enter__()

            state["thread"] = threading.Thread(target=restart)
            state["thread"].start()

    try:
        run = run_action({"model-path": str(ready_gguf), "ollama-model": f"{address}/test-team/retried",
                          "quantizations": "Q8_0", "insecure-registry": "true"}, on_line=stop_then_restart)
    finally:
        if "thread" in state:
            state["thread"].join()
        state["server"].__exit__(None, None, None)
    assert "stopped" in state
    assert run.returncode == 0, run.stdout[-3000:]
    assert "failed (attempt 1 of 3), retrying in 5 s" in run.stdout
    assert all(m["pushed"] and m["pulled"] for m in json.loads(run.outputs["models"]))
