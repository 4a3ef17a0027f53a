"""Bad input through the real entrypoint: one ::error naming the input, exit 1, nothing pushed, no
secret printed. The Hub and the registry are the real test servers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import servers
from tests.conftest import HF_REPO, action_runner, registry_tags
from tests.test_publish import make_ollama_key

pytestmark = pytest.mark.servers
TOKEN = "hf_BadInputCaseTokenNeverPrinted987654321"

CASES = {
    "missing hf-repo": ({"hf-repo": ""}, "hf-repo", "hf-repo is required"),
    "malformed ollama-model": ({"ollama-model": "{registry}/Team/SmolLM2"}, "ollama-model", "lower-case"),
    "ollama-model with a tag": ({"ollama-model": "{registry}/team/smol:1.0"}, "ollama-model", "without ':tag'"),
    "unknown quantization": ({"quantizations": "Q4_K_M, Q3_K_XL"}, "quantizations", "Unknown quantization 'Q3_K_XL'"),
    "push to ollama.com without key": ({"ollama-model": "someone/smollm2"}, "ollama-key", "needs ollama-key"),
    "malformed key": ({"ollama-key": "not a key"}, "ollama-key", "not an OpenSSH private key"),
    "unknown revision": ({"hf-revision": "v9.9.9"}, "hf-revision", "no branch, tag or commit 'v9.9.9'"),
    "missing repo": ({"hf-repo": "test-org/no-such-model"}, "hf-repo", "was not found"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, stack, run_action):
    changes, input_name, phrase = CASES[case]
    inputs = {"hf-repo": HF_REPO, "hf-token": TOKEN, "ollama-model": f"{stack.registry}/bad-inputs/smollm2",
              "insecure-registry": "true", "quantizations": "Q8_0"}
    inputs.update({k: v.format(registry=stack.registry) for k, v in changes.items()})
    run = run_action(inputs, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1
    assert len(run.errors()) == 1, run.stdout
    assert input_name in run.errors()[0] and phrase in run.errors()[0]
    assert "3. Convert" not in run.stdout  # failed before any conversion
    assert registry_tags(stack.registry, "bad-inputs/smollm2") == []
    shown = [l for l in run.stdout.splitlines() if not l.startswith("::add-mask::")]
    assert TOKEN not in "\n".join(shown) + run.stderr + run.summary + run.outputs_text
    assert run.outputs == {}


def test_unreachable_hub_fails_clearly_and_removes_the_key(stack, run_action, tmp_path):
    key = make_ollama_key(tmp_path)
    run = run_action({"hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/bad-inputs/unreachable",
                      "insecure-registry": "true", "ollama-key": key},
                     env={"HF_ENDPOINT": f"http://127.0.0.1:{servers.free_port()}"})
    assert run.returncode == 1
    assert len(run.errors()) == 1 and "Could not download" in run.errors()[0]
    assert "Hub unreachable" in run.errors()[0]
    assert registry_tags(stack.registry, "bad-inputs/unreachable") == []
    assert not (run.home / ".ollama" / "id_ed25519").exists()
    body = key.splitlines()[1]
    assert body not in "\n".join(l for l in run.stdout.splitlines() if not l.startswith("::add-mask::"))


def test_cancelled_run_cleans_up_and_pushes_nothing(stack, run_action, tmp_path):
    """GitHub cancels a job with SIGTERM: mid-conversion, the run must stop its tools and server, remove
    the key and its scratch folder, and push nothing."""
    import signal
    import socket

    key = make_ollama_key(tmp_path)
    seen: dict = {}

    def cancel_during_conversion(line, process, env):
        if line.startswith("$ ") and "convert_hf_to_gguf.py" in line and not seen:
            seen["bind"] = env["OLLAMA_HOST"]
            process.send_signal(signal.SIGTERM)

    run = run_action({"hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/bad-inputs/cancelled",
                      "insecure-registry": "true", "ollama-key": key, "quantizations": "Q8_0"},
                     env={"HF_ENDPOINT": stack.hub_endpoint}, on_line=cancel_during_conversion)
    assert seen, "the conversion never started"
    assert run.returncode == 128 + signal.SIGTERM
    assert not (run.home / ".ollama" / "id_ed25519").exists()
    assert list(run.runner_temp.glob("ollama-publish-*")) == []
    # No process may still name the scratch folder under RUNNER_TEMP (an orphaned converter usually dies
    # of a broken pipe anyway, so this catches only tools that linger silently).
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run.runner_temp).encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            pass  # the process ended while we looked
    assert leftovers == [], f"processes still running: {leftovers}"
    host, port = seen["bind"].rsplit(":", 1)
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0, "the action's Ollama server is still running"
    assert registry_tags(stack.registry, "bad-inputs/cancelled") == []


@pytest.fixture
def small_filesystem(tmp_path):
    """A 400 MB tmpfs: less than converting SmolLM2 needs (its 269 MB checkpoint plus the 16-bit GGUF)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_too_little_disk_stops_before_download(stack, small_filesystem):
    run = action_runner(small_filesystem)({
        "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/bad-inputs/small-disk", "insecure-registry": "true",
        "quantizations": "Q4_K_M"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1
    assert len(run.errors()) == 1
    error = run.errors()[0]
    assert "Not enough disk" in error and "GB free" in error and "disk-check" in error
    assert "Fetching" not in run.stderr and not list(small_filesystem.rglob("*.safetensors"))
    assert registry_tags(stack.registry, "bad-inputs/small-disk") == []
