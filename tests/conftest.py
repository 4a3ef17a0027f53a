"""Fixtures: real servers for the session, and a runner that starts the entrypoint the way GitHub
starts the container (INPUT_* variables, GITHUB_OUTPUT, GITHUB_STEP_SUMMARY, RUNNER_TEMP, ...)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests import servers

REPO_ROOT = Path(__file__).resolve().parent.parent
HF_REPO = "test-org/SmolLM2-135M-Instruct"
# The smoke test's question in the tests, unless a test sets its own: SmolLM2-135M answers it and stops at
# every quantization. At temperature 0, without the repeat penalty of 1.1 that Ollama applied by default
# before 0.30, it loops on the default one ("L'Étoile, la Cité, la France, la France, ...").
SMOKE_PROMPT = "What is the capital of Germany?"
ACTION_TIMEOUT_S = 900
# What the runner puts in a step's environment that no tool reading the repository may see.
RUNNER_SECRETS = {"ACTIONS_RUNTIME_TOKEN": "runtime-token-secret", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-secret",
                  "HF_TOKEN": "hf_EnvironmentTokenSecret", "GITHUB_TOKEN": "ghs_WorkflowTokenSecret"}
# One thread for every llama-server the tests start (through any Ollama, ours or the action's): with
# more, ggml's threads spin-wait on each other on these shared 2-core machines, about 30x slower.
# Ollama passes no -t unless num_thread is set, and llama-server then reads this variable.
os.environ["LLAMA_ARG_THREADS"] = "1"


# The folders of session fixtures (stack, ready_gguf): they outlive the test file that first asks for them.
SESSION_FOLDERS = ("stack", "ready-gguf")


@pytest.fixture(scope="module", autouse=True)
def _free_disk_after_each_file(request, tmp_path_factory) -> Iterator[None]:
    """Delete a test file's folders (its fixtures' and its tests') once the file is done, unless one of its
    tests failed: a run makes GBs of models, registries and Ollama stores, and CI's disk is shared. (The
    first fixture a file sets up, so the last torn down: its servers have stopped by then.)"""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for folder in set(base.iterdir()) - before:
            if folder.name.rstrip("0123456789") not in SESSION_FOLDERS:
                shutil.rmtree(folder, ignore_errors=True)


@dataclasses.dataclass
class Stack:
    hub_endpoint: str
    registry: str  # host:port
    mirrors: Path  # add repositories with servers.add_model_repo(stack.mirrors, ...)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[Stack]:
    checkpoint = Path(os.environ.get("SMOLLM2_CHECKPOINT", ""))
    if not (checkpoint / "model.safetensors").is_file():
        raise RuntimeError("$SMOLLM2_CHECKPOINT is not set to the SmolLM2 checkpoint: run the tests via scripts/test")
    root = tmp_path_factory.mktemp("stack")
    with servers.hub(root / "hub") as (endpoint, mirrors), servers.registry(root / "registry") as registry:
        servers.add_model_repo(mirrors, HF_REPO, checkpoint, tags=("v1.0.0",))
        yield Stack(hub_endpoint=endpoint, registry=registry, mirrors=mirrors)


@pytest.fixture(scope="session")
def ready_gguf(tmp_path_factory) -> Path:
    """A folder holding SmolLM2-135M-Instruct converted to Q8_0 by the sealed converter, as the action does,
    and its license: a repo of ready GGUF files for model-path. The tests about pushing, pulling, faults
    and re-runs start from it, where converting is not the subject (each worker converts once)."""
    from entrypoint import convert, preflight, process  # imported here: the unit tier collects this file

    checkpoint = Path(os.environ["SMOLLM2_CHECKPOINT"])
    folder = tmp_path_factory.mktemp("ready-gguf")
    seal = process.Seal(preflight.tool_memory(convert.largest_tensor(convert.safetensors_shapes(checkpoint))),
                        input_name="model-path")
    convert.convert(checkpoint, folder / "SmolLM2-135M-Instruct-Q8_0.gguf", "q8_0", "SmolLM2-135M-Instruct", seal)
    shutil.copy(checkpoint / "LICENSE", folder)
    return folder


@dataclasses.dataclass
class ActionRun:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    outputs_text: str
    summary: str
    home: Path
    workspace: Path
    runner_temp: Path

    def errors(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("::error")]


def parse_outputs(text: str) -> dict[str, str]:
    """Read a $GITHUB_OUTPUT file: name=value lines and name<<DELIM ... DELIM blocks."""
    outputs, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^([\w-]+)<<(\S+)$", lines[i])
        if match:
            name, delimiter = match.groups()
            end = lines.index(delimiter, i + 1)
            outputs[name] = "\n".join(lines[i + 1:end])
            i = end + 1
        else:
            name, _, value = lines[i].partition("=")
            outputs[name] = value
            i += 1
    return outputs


def make_ollama_key(folder: Path) -> str:
    """A new Ollama key (ed25519, OpenSSH format) written to folder/key; returns its text."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(folder / "key")], check=True)
    return (folder / "key").read_text()


def key_lines(key: str) -> list[str]:
    """The lines of a private key that are secret (the base64 body; not its BEGIN/END lines)."""
    return [line for line in key.splitlines() if len(line) > 20 and "-----" not in line]


def action_runner(tmp_path: Path):
    """A function that runs `python -m entrypoint` with the inputs given, as a container action step is run."""

    def run(inputs: dict[str, str], env: dict[str, str] | None = None, on_line=None) -> ActionRun:
        """on_line(line, process, env), if given, sees each stdout line as it is printed."""
        home, workspace, runner_temp = tmp_path / "home", tmp_path / "workspace", tmp_path / "runner_temp"
        for folder in (home, workspace, runner_temp):
            folder.mkdir(parents=True, exist_ok=True)
        output_file, summary_file = runner_temp / "github_output", runner_temp / "step_summary"
        output_file.touch()
        summary_file.touch()
        keep = ("PATH", "LANG", "LLAMA_CPP_DIR", "LLAMA_QUANTIZE", "OLLAMA_BIN", "SSL_CERT_FILE", "LLAMA_ARG_THREADS")
        full_env = {k: os.environ[k] for k in keep if k in os.environ}
        full_env.update({
            "HOME": str(home), "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace),
            "GITHUB_OUTPUT": str(output_file), "GITHUB_STEP_SUMMARY": str(summary_file),
            "GITHUB_REF_NAME": "v1.0.0", "GITHUB_REF_TYPE": "tag", "GITHUB_REPOSITORY": "test-org/model-releases",
            "RUNNER_TEMP": str(runner_temp), "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "OLLAMA_HOST": f"127.0.0.1:{servers.free_port()}", "PYTHONPATH": str(REPO_ROOT),
        })
        full_env.update({f"INPUT_{name.upper()}": value for name, value in {"smoke-test-prompt": SMOKE_PROMPT,
                                                                            **inputs}.items()})
        full_env.update(env or {})
        proc = subprocess.Popen([sys.executable, "-m", "entrypoint"], cwd=workspace, env=full_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout_lines = []
        for line in proc.stdout:  # read as it comes, so a test can act at a given stage
            stdout_lines.append(line)
            if on_line is not None:
                on_line(line, proc, full_env)
        stderr = proc.stderr.read()
        proc.wait(timeout=ACTION_TIMEOUT_S)
        outputs_text = output_file.read_text()
        return ActionRun(returncode=proc.returncode, stdout="".join(stdout_lines), stderr=stderr,
                         outputs=parse_outputs(outputs_text), outputs_text=outputs_text,
                         summary=summary_file.read_text(), home=home, workspace=workspace, runner_temp=runner_temp)

    return run


@pytest.fixture
def run_action(tmp_path):
    run = action_runner(tmp_path)
    run.workspace = tmp_path / "workspace"  # for tests that put files in the workspace first
    run.workspace.mkdir()
    return run


# A prompt-parity comparison as checks.prompt_parity logs it: "  <conversation> [<rendering>]: <verdict> ...".
_PARITY_LINE = re.compile(r"^  (?P<label>.+?) \[(?P<rendering>\w+)\]: (?P<verdict>same prompt|DIFFERENT|"
                          r"FAILED TO RENDER|the checkpoint's prompt without the reasoning)")
PARITY_VERDICTS = {"same prompt": "same", "DIFFERENT": "different", "FAILED TO RENDER": "not rendered",
                   "the checkpoint's prompt without the reasoning": "reasoning dropped"}


def parity_verdicts(stdout: str) -> dict[tuple[str, str], list[str]]:
    """Every prompt-parity comparison a run logged: (conversation, rendering) -> its verdicts, in order
    ("same", "different", "not rendered", "reasoning dropped"; one per candidate template tried)."""
    verdicts: dict[tuple[str, str], list[str]] = {}
    for line in stdout.splitlines():
        if match := _PARITY_LINE.match(line):
            verdicts.setdefault((match["label"], match["rendering"]), []).append(PARITY_VERDICTS[match["verdict"]])
    return verdicts


def registry_tags(registry: str, repository: str) -> list[str]:
    """Tags the registry holds for a repository ([] when it has none)."""
    response = requests.get(f"http://{registry}/v2/{repository}/tags/list", timeout=10)
    if response.status_code == 404:
        return []
    response.raise_for_status()
    return response.json().get("tags") or []


def registry_manifest(registry: str, repository: str, tag: str) -> tuple[str, dict]:
    response = requests.get(f"http://{registry}/v2/{repository}/manifests/{tag}", timeout=10,
                            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    response.raise_for_status()
    return response.headers["Docker-Content-Digest"], json.loads(response.content)


def pytest_sessionfinish(session):
    """On an xdist worker: hand this worker's tally to the controller (pytest_testnodedown)."""
    from tests import fault_report  # imported here: it imports this module

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["fault_counts"] = dict(fault_report.COUNTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the xdist controller: add up the tallies of the workers, as each finishes."""
    from tests import fault_report

    fault_report.COUNTS.update(getattr(node, "workeroutput", {}).get("fault_counts", {}))


def pytest_terminal_summary(terminalreporter):
    from tests import fault_report

    if any(fault_report.COUNTS.values()):
        terminalreporter.write_sep("-", "failure modes: what the tests proved")
        for line in fault_report.lines():
            terminalreporter.write_line(line)
