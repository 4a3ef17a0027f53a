"""Faults injected into real servers while the action runs: the Hub stopped mid-download, Ollama
killed during create, the registry down for good during a push. After each, the registry holds the
whole release or nothing of it, and a re-run completes what failed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from entrypoint import retry, stream
from tests import fault_report, servers
from tests.conftest import HF_REPO, action_runner

pytestmark = pytest.mark.servers
RELEASE_Q8 = {"1.0.0-q8_0", "1.0.0", "latest"}


class Restartable:
    """A server (a tests.servers context manager factory) that a test can stop and start again."""

    def __init__(self, start):
        self._start = start
        self._running: contextlib.AbstractContextManager | None = None
        self.value = None
        self.start()

    def start(self):
        self._running = self._start()
        self.value = self._running.__enter__()

    def stop(self, crash_marker: str = ""):
        """Stop gracefully, or with crash_marker, SIGKILL the processes whose command line holds it first
        (a graceful stop would let requests in flight finish)."""
        if crash_marker:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    if crash_marker.encode() in cmdline.read_bytes():
                        os.kill(int(cmdline.parent.name), signal.SIGKILL)
        if self._running is not None:
            self._running.__exit__(None, None, None)
            self._running = None


def _in_background(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_hub_stopped_mid_download_then_restarted(tmp_path, stack):
    """The Hub goes away while the weights stream into the conversion and comes back 3 s later: the download
    is retried (from where it was: this Hub ignores ranges, so the bytes before are skipped) and the release
    completes."""
    root, port = tmp_path / "flaky-hub", servers.free_port()
    hub = Restartable(lambda: servers.hub(root, port))
    endpoint, mirrors = hub.value
    servers.add_model_repo(mirrors, HF_REPO, Path(os.environ["SMOLLM2_CHECKPOINT"]), tags=("v1.0.0",))
    state: dict = {}

    def stop_when_weights_arrive(outputs: Path):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "stopped" not in state:
            # How far each weights file has come (entrypoint/feed.py).
            if any(stream.arrived(p.parent, p.stem) > 16 * 2**20
                   for p in outputs.glob(".ollama-publish-*/feed/*.arrived")):
                hub.stop(crash_marker=str(root / "olah.toml"))
                state["stopped"] = True
                fault_report.fault_injected()
                time.sleep(3)
                hub.start()
            time.sleep(0.02)

    def watch(line, process, env):
        if "files to download" in line and "watcher" not in state:
            outputs = Path(env["GITHUB_WORKSPACE"]) / "ollama-publish-out"
            state["watcher"] = _in_background(lambda: stop_when_weights_arrive(outputs))

    repository = "faults/hub-restarted"
    try:
        run = action_runner(tmp_path / "run")({
            "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/{repository}", "quantizations": "Q8_0",
            "insecure-registry": "true"}, env={"HF_ENDPOINT": endpoint}, on_line=watch)
    finally:
        if "watcher" in state:
            state["watcher"].join()
        hub.stop()
    assert state.get("stopped"), "the download finished before the Hub could be stopped"
    assert "downloading test-org/SmolLM2-135M-Instruct's model.safetensors failed (attempt 1 of 3), retrying" \
        in run.stdout
    assert run.returncode == 0, run.stdout[-3000:]
    fault_report.run_recovered()
    assert fault_report.assert_all_or_nothing(stack.registry, repository, RELEASE_Q8) == RELEASE_Q8


def _ollama_server_pids(bind: str) -> list[int]:
    """`ollama serve` processes started with OLLAMA_HOST=bind (the action's own server)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"OLLAMA_HOST={bind}".encode() in environ.read_bytes().split(b"\0") and \
                    b"serve" in (environ.parent / "cmdline").read_bytes():
                pids.append(int(environ.parent.name))
        except OSError:
            pass  # ended while we looked, or not ours to read
    return pids


def test_ollama_killed_during_create_fails_clearly_and_a_rerun_completes(tmp_path, stack, ready_gguf):
    repository = "faults/ollama-killed"
    inputs = {"model-path": str(ready_gguf), "ollama-model": f"{stack.registry}/{repository}",
              "quantizations": "Q8_0", "insecure-registry": "true"}
    env: dict[str, str] = {}
    killed: list[int] = []

    def kill_during_create(line, process, run_env):
        if line.startswith("creating ") and not killed:
            killed.extend(_ollama_server_pids(run_env["OLLAMA_HOST"]))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            fault_report.fault_injected()

    failed = action_runner(tmp_path / "first")(inputs, env=env, on_line=kill_during_create)
    assert killed, "no Ollama server was found to kill"
    assert failed.returncode == 1
    assert len(failed.errors()) == 1 and "The Ollama server had exited" in failed.errors()[0], failed.stdout[-3000:]
    assert "6. Push" not in failed.stdout
    assert fault_report.assert_all_or_nothing(stack.registry, repository, RELEASE_Q8) == set()

    rerun = action_runner(tmp_path / "rerun")(inputs, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    fault_report.run_recovered()
    assert fault_report.assert_all_or_nothing(stack.registry, repository, RELEASE_Q8) == RELEASE_Q8


def test_registry_down_for_good_fails_after_retries_and_a_rerun_completes(tmp_path, stack, ready_gguf):
    """The registry stops as the first push starts and stays down: three attempts, one clear error,
    nothing published. Once it is back, the same release run again publishes everything."""
    root, address = tmp_path / "down-registry", f"127.0.0.1:{servers.free_port()}"
    registry = Restartable(lambda: servers.registry(root, address))
    repository = "faults/registry-down"
    inputs = {"model-path": str(ready_gguf), "ollama-model": f"{address}/{repository}", "quantizations": "Q8_0",
              "insecure-registry": "true"}
    env: dict[str, str] = {}
    stopped: list[bool] = []

    def stop_at_push(line, process, run_env):
        if line.startswith("pushing ") and not stopped:
            registry.stop()
            stopped.append(True)
            fault_report.fault_injected()

    try:
        failed = action_runner(tmp_path / "first")(inputs, env=env, on_line=stop_at_push)
        assert stopped
        assert failed.returncode == 1
        assert failed.stdout.count("retrying in") == len(retry.DELAYS_S)  # every attempt but the last
        assert len(failed.errors()) == 1 and "push" in failed.errors()[0].lower(), failed.stdout[-3000:]
        registry.start()
        assert fault_report.assert_all_or_nothing(address, repository, RELEASE_Q8) == set()

        rerun = action_runner(tmp_path / "rerun")(inputs, env=env)
        assert rerun.returncode == 0, rerun.stdout[-3000:]
        fault_report.run_recovered()
        assert fault_report.assert_all_or_nothing(address, repository, RELEASE_Q8) == RELEASE_Q8
        assert all(m["pushed"] and m["pulled"] for m in json.loads(rerun.outputs["models"]))
    finally:
        registry.stop()


def _manifest_puts(status: int, times: int):
    """An intercept for servers.relay: the registry's answer to the first `times` manifest uploads (the
    last request of a push) is `status`."""
    answered: list[str] = []

    def intercept(method: str, path: str) -> int | None:
        if method == "PUT" and "/manifests/" in path and len(answered) < times:
            answered.append(path)
            fault_report.fault_injected()
            return status
        return None

    return intercept


def _writes_need_credentials(challenge: Callable[[], str]):
    """An intercept for servers.relay: a registry that lets anyone read but demands credentials for every
    upload (POST, PUT, PATCH), with challenge() as its WWW-Authenticate; its token endpoint (/token, on
    the same host) refuses whatever Ollama signs."""
    def intercept(method: str, path: str) -> servers.Answer | None:
        if path.startswith("/token"):
            return 401
        if method in ("POST", "PUT", "PATCH"):
            fault_report.fault_injected()
            return 401, {"WWW-Authenticate": challenge()}
        return None

    return intercept


@pytest.mark.parametrize("scheme", ["bearer token refused", "basic"])
def test_a_push_the_registry_refuses_is_not_retried(tmp_path, stack, ready_gguf, scheme):
    """A registry that demands credentials: Ollama asks a token server on the registry's own host (which
    refuses this key), or cannot answer a Basic challenge at all. One attempt, 401 named, nothing published."""
    repository = f"faults/push-refused-{scheme.split()[0]}"
    front: dict[str, str] = {}
    challenge = (lambda: f'Bearer realm="http://{front["address"]}/token",service="registry"') \
        if scheme.startswith("bearer") else (lambda: 'Basic realm="Registry Realm"')
    with servers.relay(f"http://{stack.registry}", _writes_need_credentials(challenge)) as address:
        front["address"] = address
        run = action_runner(tmp_path)({"model-path": str(ready_gguf), "ollama-model": f"{address}/{repository}",
                                       "quantizations": "Q8_0", "insecure-registry": "true"})
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1 and "title=Push refused" in errors[0], errors
    assert ("401" in errors[0]) if scheme.startswith("bearer") else ("sends no passwords" in errors[0]), errors
    assert "retrying" not in run.stdout
    assert fault_report.assert_all_or_nothing(stack.registry, repository, RELEASE_Q8) == set()


def test_a_push_answered_503_is_retried_and_completes(tmp_path, stack, ready_gguf):
    repository = "faults/push-503"
    with servers.relay(f"http://{stack.registry}", _manifest_puts(503, times=1)) as front:
        run = action_runner(tmp_path)({"model-path": str(ready_gguf), "ollama-model": f"{front}/{repository}",
                                       "quantizations": "Q8_0", "insecure-registry": "true"})
    assert run.returncode == 0, run.stdout[-3000:]
    retries = [line for line in run.stdout.splitlines() if "retrying in" in line]
    assert len(retries) == 1 and "pushing" in retries[0] and "503" in retries[0], retries
    fault_report.run_recovered()
    assert fault_report.assert_all_or_nothing(stack.registry, repository, RELEASE_Q8) == RELEASE_Q8
    assert all(m["pushed"] and m["pulled"] for m in json.loads(run.outputs["models"]))
