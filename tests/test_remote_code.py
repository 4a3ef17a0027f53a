"""No repository's code runs: tripwire checkpoints on the test Hub whose tokenizer names a module that
writes a file when imported, in another repository, in the repository itself, and in a LoRA adapter's
base. Through the real entrypoint (and once through the action's image): each is refused by name before
any weights are downloaded, nothing is pushed, and the file is never written. Then the second line on
its own: the converter, started exactly as the action starts it, on a tripwire that the refusal would
have stopped, imports nothing and fetches nothing; and the action's own environment is out of its reach."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import docker
import pytest

from entrypoint import convert, process
from entrypoint.errors import RemoteCodeRefused, ToolRaised
from tests import fault_report, servers
from tests.conftest import registry_tags
from tests.container import IMAGE, Runner

pytestmark = pytest.mark.servers
CODE_REPO = "tripwire-org/tokenizer-code"  # the other repository, holding only the module
OTHER_REPO_CODE = "tripwire-org/smollm2-code-elsewhere"
OWN_CODE = "tripwire-org/smollm2-own-code"
LORA_ON_OWN_CODE = "tripwire-org/lora-on-own-code"
# Not a speed target: a guard against a run that goes on to download and convert (the refusal comes
# before any weights are downloaded, seconds after Ollama starts).
REFUSAL_GUARD_S = 120


def _tripwire_module(tripped: Path) -> str:
    return (f"open({str(tripped)!r}, 'w').write('repository code ran')\n"
            "from transformers import PreTrainedTokenizerFast\n\n\n"
            "class TripTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def _tokenizer_naming(folder: Path, module: str) -> None:
    """The tokenizer class a Llama checkpoint hands to AutoTokenizer(trust_remote_code=True) in llama.cpp's
    converter, with the auto_map that tells transformers where its code is."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **config, "tokenizer_class": "HybridDNATokenizer", "auto_map": {"AutoTokenizer": [module, None]}}))


def _checkpoint_copy(folder: Path) -> Path:
    shutil.copytree(os.environ["SMOLLM2_CHECKPOINT"], folder, copy_function=os.link)  # the weights linked
    (folder / "tokenizer_config.json").unlink()  # rewritten, not changed through the link
    shutil.copy(Path(os.environ["SMOLLM2_CHECKPOINT"]) / "tokenizer_config.json", folder)
    return folder


@pytest.fixture(scope="module")
def tripwire(stack, tmp_path_factory) -> Path:
    """The tripwire repositories on the test Hub; returns the folder where a module that ran leaves a file."""
    root = tmp_path_factory.mktemp("tripwire")
    tripped = root / "tripped"
    tripped.mkdir()
    code = root / "code"
    code.mkdir()
    (code / "tokenization_trip.py").write_text(_tripwire_module(tripped / "other-repo"))
    servers.add_model_repo(stack.mirrors, CODE_REPO, code)

    elsewhere = _checkpoint_copy(root / "elsewhere")
    _tokenizer_naming(elsewhere, f"{CODE_REPO}--tokenization_trip.TripTokenizer")
    servers.add_model_repo(stack.mirrors, OTHER_REPO_CODE, elsewhere)

    own = _checkpoint_copy(root / "own")
    _tokenizer_naming(own, "tokenization_trip.TripTokenizer")
    (own / "tokenization_trip.py").write_text(_tripwire_module(tripped / "own-repo"))
    servers.add_model_repo(stack.mirrors, OWN_CODE, own)

    adapter = root / "adapter"
    shutil.copytree(os.environ["SMOLLM2_LORA"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": OWN_CODE}))
    servers.add_model_repo(stack.mirrors, LORA_ON_OWN_CODE, adapter)
    return tripped


def _assert_refused(stack, errors: list[str], stdout: str, elapsed: float, repository: str, tripped: Path) -> str:
    assert len(errors) == 1, stdout[-3000:]
    error = errors[0]
    assert "title=Repository code refused" in error and "crashed" not in error
    assert "tokenizer_config.json: auto_map" in error and "HybridDNATokenizer" in error
    assert elapsed < REFUSAL_GUARD_S, f"refused only after {elapsed:.0f} s"
    # refused on its other files, before any weights
    assert "downloading model.safetensors" not in stdout and "stream from the Hub" not in stdout
    assert "convert_hf_to_gguf.py" not in stdout
    assert registry_tags(stack.registry, repository) == []
    assert not list(tripped.iterdir()), "a tripwire module ran"
    fault_report.remote_code_refused()
    return error


@pytest.mark.parametrize("hf_repo, input_name, module", [
    (OTHER_REPO_CODE, "hf-repo", f"{CODE_REPO}--tokenization_trip.TripTokenizer"),
    (OWN_CODE, "hf-repo", "tokenization_trip.TripTokenizer"),
    (LORA_ON_OWN_CODE, "base-model", "tokenization_trip.TripTokenizer"),
])
def test_declared_code_is_refused_before_any_weights(stack, run_action, tripwire, hf_repo, input_name, module):
    repository = f"tripwire/{hf_repo.split('/')[1]}"
    start = time.monotonic()
    run = run_action({"hf-repo": hf_repo, "ollama-model": f"{stack.registry}/{repository}",
                      "insecure-registry": "true", "quantizations": "Q8_0"}, env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.returncode == 1
    error = _assert_refused(stack, run.errors(), run.stdout, time.monotonic() - start, repository, tripwire)
    assert module in error and f"(input: {input_name})" in error


def test_the_image_refuses_code_from_another_repository(stack, tmp_path, tripwire):
    repository = "tripwire/container"
    start = time.monotonic()
    run = Runner(tmp_path).run({"hf-repo": OTHER_REPO_CODE, "ollama-model": f"{stack.registry}/{repository}",
                                "insecure-registry": "true", "quantizations": "Q8_0"},
                               env={"HF_ENDPOINT": stack.hub_endpoint})
    assert run.exit_code == 1
    _assert_refused(stack, run.errors(), run.stdout, time.monotonic() - start, repository, tripwire)


SEAL = process.Seal(memory_bytes=3 * 2**30, input_name="hf-repo")


def test_the_sealed_converter_runs_no_repository_code(tmp_path, tripwire):
    """The second line alone: the converter as the action starts it, on the tripwire the refusal stops.
    transformers copies the repository's module into its cache and is stopped as it runs it."""
    checkpoint = _checkpoint_copy(tmp_path / "own")
    _tokenizer_naming(checkpoint, "tokenization_trip.TripTokenizer")
    (checkpoint / "tokenization_trip.py").write_text(_tripwire_module(tripwire / "sealed-own"))
    with pytest.raises(RemoteCodeRefused) as refused:
        convert.convert(checkpoint, tmp_path / "out.gguf", "q8_0", "trip", SEAL)
    assert refused.value.attempt == "code" and "tokenization_trip.py" in refused.value.message
    assert not list(tripwire.iterdir()) and not (tmp_path / "out.gguf").exists()
    fault_report.remote_code_refused()


def test_the_sealed_converter_fetches_nothing(stack, tmp_path, tripwire, monkeypatch):
    """The module in another repository: with the action's own HF_ENDPOINT pointing at a front of the test
    Hub that records what it is asked, the converter asks it nothing (offline, and sealed)."""
    requests_seen: list[str] = []
    with servers.relay(stack.hub_endpoint, lambda method, path: requests_seen.append(path)) as front:
        monkeypatch.setenv("HF_ENDPOINT", f"http://{front}")
        checkpoint = _checkpoint_copy(tmp_path / "elsewhere")
        _tokenizer_naming(checkpoint, f"{CODE_REPO}--tokenization_trip.TripTokenizer")
        with pytest.raises((RemoteCodeRefused, ToolRaised)):
            convert.convert(checkpoint, tmp_path / "out.gguf", "q8_0", "trip", SEAL)
    assert requests_seen == []
    assert not list(tripwire.iterdir())


def test_in_the_image_a_sealed_child_cannot_read_the_actions_environment():
    """In the container (as GitHub runs it: root without CAP_SYS_PTRACE), the action's process is
    non-dumpable, so a sealed child cannot read /proc/<action>/environ, where the runner put the secret
    inputs; nor can it open a socket. The child is started as the action starts its tools."""
    code = ("import json, os, subprocess, sys\n"
            "from entrypoint import process\n"
            "process.keep_secrets_from_children()\n"
            "probe = (\"import os, socket\\n\"\n"
            "         \"try:\\n    print('environ', open('/proc/%d/environ' % os.getppid(), 'rb').read()[:40])\\n\"\n"
            "         \"except OSError as e:\\n    print('environ refused', e.errno)\\n\"\n"
            "         \"try:\\n    socket.socket(); print('socket opened')\\n\"\n"
            "         \"except OSError as e:\\n    print('socket refused', e.errno)\\n\")\n"
            "command = process.sealed_command([sys.executable, '-I', '-c', probe], how='exec', report=None,\n"
            "                                 memory_bytes=2**30)\n"
            "print(subprocess.run(command, capture_output=True, text=True, env=process.sealed_environment(\n"
            "    process.NOWHERE)).stdout)\n")
    client = docker.DockerClient(base_url=os.environ["DOCKER_HOST"], timeout=120)
    output = client.containers.run(IMAGE, entrypoint=["python", "-c", code], network_mode="host", remove=True,
                                   environment={"INPUT_HF-TOKEN": "hf_SecretThatStaysWithTheAction"}).decode()
    assert "environ refused 13" in output and "socket refused 13" in output, output
    assert "hf_Secret" not in output

