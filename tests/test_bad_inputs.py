"""Bad input through the real entrypoint: one ::error naming the input, exit 1, nothing pushed, no
secret printed. The Hub and the registry are the real test servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from entrypoint.quantize import tag_suffix
from tests import fault_report, servers
from tests.material import bert
from tests.conftest import HF_REPO, action_runner, make_ollama_key, registry_tags

pytestmark = pytest.mark.servers
TOKEN = "hf_BadInputCaseTokenNeverPrinted987654321"

# name: (inputs changed, environment changed, the input or cause the error names, a phrase of it).
# {registry} is the test registry, {free} a port nobody listens on, {busy} one that is taken.
CASES = {
    "missing hf-repo": ({"hf-repo": ""}, {}, "hf-repo", "hf-repo is required"),
    "invalid hf-repo": ({"hf-repo": "not a/repo id"}, {}, "hf-repo", "not a Hugging Face repo id"),
    "missing repo": ({"hf-repo": "test-org/no-such-model"}, {}, "hf-repo", "was not found"),
    "unknown revision": ({"hf-revision": "v9.9.9"}, {}, "hf-revision", "no branch, tag or commit 'v9.9.9'"),
    "private repo without token": ({"hf-repo": "private-org/smollm2", "hf-token": ""}, {}, "hf-repo",
                                   "it is private and hf-token is not set"),
    "ollama-model in upper case": ({"ollama-model": "{registry}/Team/SmolLM2"}, {}, "ollama-model", "lower-case"),
    "ollama-model without namespace": ({"ollama-model": "smollm2"}, {}, "ollama-model", "namespace/model"),
    "ollama-model with bad characters": ({"ollama-model": "{registry}/team/smol lm!"}, {}, "ollama-model",
                                         "only lower-case letters"),
    "ollama-model with a tag": ({"ollama-model": "{registry}/team/smol:1.0"}, {}, "ollama-model", "without ':tag'"),
    "unknown quantization": ({"quantizations": "Q4_K_M, Q3_K_XL"}, {}, "quantizations",
                             "Unknown quantization 'Q3_K_XL'"),
    "unknown template name": ({"template": "llama9"}, {}, "template", "neither 'auto', a catalog template"),
    "push to ollama.com without key": ({"ollama-model": "someone/smollm2"}, {}, "ollama-key", "needs ollama-key"),
    "malformed key": ({"ollama-key": "not a key"}, {}, "ollama-key", "not an OpenSSH private key"),
    "registry unreachable": ({"ollama-model": "127.0.0.1:{free}/team/smollm2"}, {}, "ollama-model",
                             "does not answer"),
    "Ollama port already taken": ({}, {"OLLAMA_HOST": "127.0.0.1:{busy}"}, "ollama-host", "already listens on"),
    "repo without weights": ({"hf-repo": "test-org/no-weights"}, {}, "hf-repo",
                             "has no model*.safetensors weights at its top level"),
    "unsupported architecture": ({"hf-repo": "test-org/unknown-architecture"}, {}, "hf-repo",
                                 "architecture 'FrobnicatorForCausalLM', which llama.cpp's converter does not"),
    "pickle-only repo": ({"hf-repo": "test-org/pickle-only"}, {}, "hf-repo", "only pickle weights (pytorch_model.bin)"),
    "GGUF repo without the quantization": ({"hf-repo": "test-org/gguf-only"}, {}, "quantizations",
                                           "no GGUF file for Q8_0. It offers: Q4_1 (SmolLM2-135M-Instruct.Q4_1.gguf)"),
    "unknown repo-kind": ({"repo-kind": "vision"}, {}, "repo-kind", "'vision' is not a repo kind"),
    "encoder without pooling": ({"hf-repo": "test-org/bert-no-pooling"}, {}, "hf-repo",
                                "an encoder (BertModel), which Ollama serves as an embedding model"),
    "LoRA adapter whose base is a local path": ({"hf-repo": "test-org/lora-local-base"}, {}, "base-model",
                                                "names its base model as '/"),
    "LoRA base that does not exist": ({"hf-repo": "test-org/lora-local-base", "base-model": "test-org/no-such-base"},
                                      {}, "base-model", "'test-org/no-such-base' was not found"),
    "DoRA adapter": ({"hf-repo": "test-org/dora"}, {}, "hf-repo", "DoRA (use_dora)"),
    "system prompt for a template that drops system messages": (
        {"hf-repo": "test-org/drops-system", "system": "You are a pirate."}, {}, "system",
        "has no system turn (it refuses or drops system messages)"),
}


@pytest.fixture(scope="module")
def bad_repos(stack, tmp_path_factory):
    """Hub repos that are wrong in one way each (real files, real Hub server)."""
    checkpoint = Path(os.environ["SMOLLM2_CHECKPOINT"])
    folder = tmp_path_factory.mktemp("bad-repos")
    no_weights = folder / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, no_weights / name)
    servers.add_model_repo(stack.mirrors, "test-org/no-weights", no_weights)
    unknown = folder / "unknown-architecture"
    shutil.copytree(checkpoint, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["FrobnicatorForCausalLM"]}))
    servers.add_model_repo(stack.mirrors, "test-org/unknown-architecture", unknown)
    servers.add_model_repo(stack.mirrors, "private-org/smollm2", checkpoint)
    pickle_only = folder / "pickle-only"
    pickle_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, pickle_only / name)
    import torch  # a real (if tiny) pickle checkpoint; it is refused by name, before any download

    torch.save({"lm_head.weight": torch.zeros(2, 2)}, pickle_only / "pytorch_model.bin")
    servers.add_model_repo(stack.mirrors, "test-org/pickle-only", pickle_only)
    gguf_only = folder / "gguf-only"
    gguf_only.mkdir()
    shutil.copy(os.environ["SMOLLM2_GGUF"], gguf_only)
    servers.add_model_repo(stack.mirrors, "test-org/gguf-only", gguf_only)
    bert.build(folder / "bert-no-pooling", pooling=False)
    # The test adapter as peft saved it: its base_model_name_or_path is the local folder it was trained from.
    servers.add_model_repo(stack.mirrors, "test-org/lora-local-base", Path(os.environ["SMOLLM2_LORA"]))
    dora = folder / "dora"
    shutil.copytree(os.environ["SMOLLM2_LORA"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    dora_config = {**config, "use_dora": True, "base_model_name_or_path": HF_REPO}
    (dora / "adapter_config.json").write_text(json.dumps(dora_config))
    servers.add_model_repo(stack.mirrors, "test-org/dora", dora)
    servers.add_model_repo(stack.mirrors, "test-org/bert-no-pooling", folder / "bert-no-pooling")
    # SmolLM2's ChatML, but every system message skipped: a system prompt would never reach the model.
    drops_system = folder / "drops-system"
    shutil.copytree(checkpoint, drops_system)
    config = json.loads((drops_system / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m.role != 'system' %}<|im_start|>{{ m.role }}\n"
                               "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (drops_system / "tokenizer_config.json").write_text(json.dumps(config))
    (drops_system / "chat_template.jinja").unlink(missing_ok=True)
    servers.add_model_repo(stack.mirrors, "test-org/drops-system", drops_system)


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, stack, bad_repos, run_action):
    changes, env_changes, input_name, phrase = CASES[case]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"registry": stack.registry, "free": servers.free_port(), "busy": busy.getsockname()[1]}
        inputs = {"hf-repo": HF_REPO, "hf-token": TOKEN, "ollama-model": f"{stack.registry}/bad-inputs/smollm2",
                  "insecure-registry": "true", "quantizations": "Q8_0"}
        inputs.update({k: v.format(**ports) for k, v in changes.items()})
        env = {"HF_ENDPOINT": stack.hub_endpoint, **{k: v.format(**ports) for k, v in env_changes.items()}}
        run = run_action(inputs, env=env)
    assert run.returncode == 1
    assert len(run.errors()) == 1, run.stdout
    assert input_name in run.errors()[0] and phrase in run.errors()[0], run.errors()[0]
    # Failed before any weights were downloaded (a repository's other files may have been, to check them).
    assert "downloading model" not in run.stdout and "stream from the Hub" not in run.stdout
    assert "3. Convert" not in run.stdout
    assert registry_tags(stack.registry, "bad-inputs/smollm2") == []
    shown = [line for line in run.stdout.splitlines() if not line.startswith("::add-mask::")]
    assert TOKEN not in "\n".join(shown) + run.stderr + run.summary + run.outputs_text
    assert run.outputs == {}
    fault_report.bad_input_refused()


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
    assert body not in "\n".join(line for line in run.stdout.splitlines() if not line.startswith("::add-mask::"))


@pytest.mark.parametrize("tool, quantizations", [("convert_hf_to_gguf.py", "Q8_0"), ("llama-quantize", "Q4_K_M")])
def test_cancelled_run_cleans_up_and_pushes_nothing(stack, run_action, tmp_path, tool, quantizations):
    """GitHub cancels a job with SIGTERM: mid-conversion or mid-quantization, the run must stop its
    tools and server, remove the key and its scratch folder, leave no GGUF that looks finished, and
    push nothing."""
    key = make_ollama_key(tmp_path)
    seen: dict = {}

    def cancel_during_tool(line, process, env):
        if line.startswith("$ ") and tool in line and not seen:
            seen["bind"] = env["OLLAMA_HOST"]
            process.send_signal(signal.SIGTERM)
            fault_report.fault_injected()

    repository = f"bad-inputs/cancelled-{quantizations.lower()}"
    run = run_action({"hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/{repository}",
                      "insecure-registry": "true", "ollama-key": key, "quantizations": quantizations},
                     env={"HF_ENDPOINT": stack.hub_endpoint}, on_line=cancel_during_tool)
    assert seen, f"{tool} never started"
    assert run.returncode == 128 + signal.SIGTERM
    assert not (run.home / ".ollama" / "id_ed25519").exists()
    outputs = run.workspace / "ollama-publish-out"
    assert list(outputs.glob(".ollama-publish-*")) == []  # the scratch folder
    assert list(outputs.glob("*.gguf*")) == []
    # No process may still name the output folder (an orphaned converter usually dies of a broken pipe
    # anyway, so this catches only tools that linger silently).
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(outputs).encode() in cmdline.read_bytes():
                leftovers.append(f"{cmdline.parent.name}: {cmdline.read_bytes()[:300]!r}")
        except OSError:
            pass  # the process ended while we looked
    assert leftovers == [], f"processes still running: {leftovers}"
    host, port = seen["bind"].rsplit(":", 1)
    with socket.socket() as s:
        assert s.connect_ex((host, int(port))) != 0, "the action's Ollama server is still running"
    release = {f"1.0.0-{tag_suffix(quantizations)}", "1.0.0", "latest"}
    assert fault_report.assert_all_or_nothing(stack.registry, repository, release) == set()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 120 MB tmpfs: less than publishing SmolLM2 at Q4_K_M needs even when its weights stream from the Hub
    (the 105 MB output, then its copy pulled back)."""
    with servers.tmpfs(tmp_path / "small", 120) as mount:
        yield mount


def test_too_little_disk_stops_before_download(stack, small_filesystem):
    run = action_runner(small_filesystem)({
        "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/bad-inputs/small-disk", "insecure-registry": "true",
        "quantizations": "Q4_K_M"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1
    assert len(run.errors()) == 1
    error = run.errors()[0]
    assert "Not enough disk" in error and "GB free" in error and "resource-check" in error
    assert "downloading model.safetensors" not in run.stdout and "stream from the Hub" not in run.stdout
    assert not list(small_filesystem.rglob("*.safetensors"))
    assert registry_tags(stack.registry, "bad-inputs/small-disk") == []
    fault_report.bad_input_refused()


def test_too_little_disk_with_resource_check_warn_warns_and_goes_on(stack, small_filesystem):
    """resource-check: warn: the same estimate is a warning, the run goes on, and the disk fills as
    estimated: one "Disk full" error, nothing pushed."""
    run = action_runner(small_filesystem)({
        "hf-repo": HF_REPO, "ollama-model": f"{stack.registry}/bad-inputs/small-disk-warn", "insecure-registry": "true",
        "quantizations": "Q4_K_M", "resource-check": "warn"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    warnings = [line for line in run.stdout.splitlines() if line.startswith("::warning")]
    assert any("Not enough disk" in w and "(resource-check: warn, so the run goes on)" in w for w in warnings), warnings
    assert "stream from the Hub while they are converted" in run.stdout
    assert run.returncode == 1 and len(run.errors()) == 1 and "title=Disk full" in run.errors()[0], run.errors()
    assert registry_tags(stack.registry, "bad-inputs/small-disk-warn") == []
    fault_report.disk_full_named()
