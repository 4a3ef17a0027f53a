"""End to end, against real servers: olah as the Hub, docker-registry as the registry, Ollama built
from source, llama.cpp's converter and llama-quantize, and the real SmolLM2-135M-Instruct weights."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from entrypoint import checks
from entrypoint.ollama import file_sha256
from entrypoint.quantize import tag_suffix
from tests import servers
from tests.conftest import (HF_REPO, REPO_ROOT, SMOKE_PROMPT, action_runner, parity_verdicts, registry_manifest,
                            registry_tags)

pytestmark = pytest.mark.servers
HF_TOKEN = "hf_TestTokenThatMustNeverBeLogged0123456789"
TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "chat"
OLLAMA_LAYERS = {"application/vnd.ollama.image.model", "application/vnd.ollama.image.template",
                 "application/vnd.ollama.image.params"}


def make_ollama_key(folder: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(folder / "key")], check=True)
    return (folder / "key").read_text()


# What the runner puts in the step's environment that no tool reading the repository may see.
RUNNER_SECRETS = {"ACTIONS_RUNTIME_TOKEN": "runtime-token-secret", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-secret",
                  "HF_TOKEN": "hf_EnvironmentTokenSecret", "GITHUB_TOKEN": "ghs_WorkflowTokenSecret"}


def _process_of(marker: str, under: Path) -> int | None:
    """The pid of a process whose command line holds `marker` and a path under `under`."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in command and str(under) in command and entry.name.isdigit():
            return int(entry.name)
    return None


class _Witness:
    """Watches a run from its log: when the converter starts, reads its environment from /proc and looks for
    the push key on disk; when the push starts, looks where the action's server reads the key."""

    def __init__(self, root: Path, key: str):
        # The OpenSSH header every ed25519 key shares (its first ~80 base64 characters) left out.
        self.root, self.key_body = root, "".join(key.splitlines()[1:-1])[100:]
        self.converter_environ: dict[str, str] | None = None
        self.key_files_while_converting: list[str] | None = None
        self.key_in_place_while_pushing: bool | None = None

    def on_line(self, line: str, proc, env) -> None:
        if line.startswith("$ ") and "convert_hf_to_gguf.py" in line and self.converter_environ is None:
            pid = None
            for _ in range(100):  # the line is logged as the tool starts
                pid = _process_of("convert_hf_to_gguf.py", self.root)
                if pid:
                    break
                time.sleep(0.05)
            assert pid, "the converter's process was not found"
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            self.converter_environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
            self.key_files_while_converting = self._files_holding_the_key()
        elif line.startswith("pushing ") and self.key_in_place_while_pushing is None:
            homes = list(self.root.rglob(".ollama-publish-*/home/.ollama/id_ed25519"))
            self.key_in_place_while_pushing = any(self.key_body in "".join(p.read_text().splitlines()[1:-1])
                                                  for p in homes)

    def _files_holding_the_key(self) -> list[str]:
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 10**6:
                with contextlib.suppress(OSError):
                    if self.key_body[:60] in path.read_text(errors="replace").replace("\n", ""):
                        found.append(str(path))
        return found


@pytest.fixture(scope="module")
def release(stack, tmp_path_factory):
    """One full release, v1.0.0 with Q4_K_M and Q8_0, shared by the assertions below; watched (_Witness)."""
    key = make_ollama_key(tmp_path_factory.mktemp("key"))
    root = tmp_path_factory.mktemp("release")
    witness = _Witness(root, key)
    run = action_runner(root)({
        "hf-repo": HF_REPO, "hf-revision": "v1.0.0", "hf-token": HF_TOKEN,
        "ollama-model": f"{stack.registry}/test-team/smollm2", "quantizations": "Q4_K_M, q8_0",
        "insecure-registry": "true", "ollama-key": key,
    }, env={"HF_ENDPOINT": stack.hub_endpoint, **RUNNER_SECRETS}, on_line=witness.on_line)
    print(run.stdout[-4000:], run.stderr[-2000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run.witness = witness
    return run, key


@pytest.mark.dev
def test_the_converter_sees_none_of_the_runs_secrets(release):
    """Read from /proc while it ran: no ACTIONS_* or GitHub token, no Hub token or endpoint, no input; offline."""
    run, key = release
    environ = run.witness.converter_environ
    assert environ is not None
    assert not [name for name in environ if name.startswith(("ACTIONS_", "GITHUB_", "INPUT_", "RUNNER_"))], environ
    assert "HF_ENDPOINT" not in environ and "HF_TOKEN" not in environ
    secrets = [HF_TOKEN, *RUNNER_SECRETS.values(), "".join(key.splitlines()[1:-1])[100:160]]
    assert not [secret for secret in secrets if secret in json.dumps(environ)]
    assert environ["HF_HUB_OFFLINE"] == environ["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.dev
def test_the_push_key_is_on_disk_only_while_pushing(release):
    run, _ = release
    assert run.witness.key_files_while_converting == []  # nowhere under the run's folders, the scratch included
    assert run.witness.key_in_place_while_pushing is True
    assert not list(run.workspace.rglob("id_ed25519"))  # removed with the scratch space


@pytest.mark.dev
def test_every_tag_is_created_and_pushed(release, stack):
    run, _ = release
    models = json.loads(run.outputs["models"])
    assert [(m["tag"], m["quantization"]) for m in models] == [
        ("1.0.0-q4_K_M", "Q4_K_M"), ("1.0.0-q8_0", "Q8_0"), ("1.0.0", "Q4_K_M"), ("latest", "Q4_K_M")]
    assert all(m["pushed"] and m["pulled"] for m in models)
    # The empty Ollama pulled every tag and answered once per quantization.
    pulled = [line.split(":")[0] for line in run.stdout.splitlines()
              if "pulled by an empty Ollama, same blobs; " in line]
    assert sorted(pulled) == sorted({m["quantization"] for m in models})
    assert all(m["name"] == f"{stack.registry}/test-team/smollm2:{m['tag']}" for m in models)
    assert sorted(registry_tags(stack.registry, "test-team/smollm2")) == sorted(m["tag"] for m in models)


@pytest.mark.dev
def test_q8_model_answers_berlin_and_stops(release):
    run, _ = release
    q8 = next(m for m in json.loads(run.outputs["models"]) if m["quantization"] == "Q8_0")
    assert "Berlin" in q8["answer"]
    # The smoke test asks each quantization once (aliases are the same model), and once more pulled back by
    # the empty Ollama; each stopped by itself.
    quantizations = {m["quantization"] for m in json.loads(run.outputs["models"])}
    assert run.stdout.count("(done_reason: stop)") == 2 * len(quantizations)
    assert "(done_reason: length)" not in run.stdout
    assert all(m["answer"] for m in json.loads(run.outputs["models"]))


@pytest.mark.dev
def test_registry_holds_exactly_the_published_files(release, stack):
    """Each tag's manifest: the model layer is the GGUF left in output-dir, byte for byte; the template
    and parameters layers are the Modelfile's."""
    run, _ = release
    ggufs = {Path(p).name: run.workspace / p for p in run.outputs["gguf-paths"].splitlines()}
    modelfile = (run.workspace / run.outputs["modelfile"]).read_text()
    for model in json.loads(run.outputs["models"]):
        digest, remote = registry_manifest(stack.registry, "test-team/smollm2", model["tag"])
        assert digest == model["registry_digest"]
        layers = {layer["mediaType"]: layer["digest"] for layer in remote["layers"]}
        assert OLLAMA_LAYERS <= set(layers)
        gguf = ggufs[f"smollm2-{tag_suffix(model['quantization'])}.gguf"]
        assert layers["application/vnd.ollama.image.model"] == "sha256:" + file_sha256(gguf)
        blob = f"http://{stack.registry}/v2/test-team/smollm2/blobs/"
        template = requests.get(blob + layers["application/vnd.ollama.image.template"], timeout=10).text
        assert f'TEMPLATE """{template}"""' in modelfile
        params = requests.get(blob + layers["application/vnd.ollama.image.params"], timeout=10).json()
        assert params["stop"] == ["<|im_end|>"]
    # The GGUFs were handed to the action's Ollama as hard links, not uploaded as copies.
    linked = [line.split()[0] for line in run.stdout.splitlines() if line.endswith("(hard link, no copy)")]
    assert sorted(linked) == sorted(ggufs)
    # Aliases point at the same manifest as the version tag they alias.
    by_tag = {m["tag"]: m["digest"] for m in json.loads(run.outputs["models"])}
    assert by_tag["1.0.0"] == by_tag["latest"] == by_tag["1.0.0-q4_K_M"] != by_tag["1.0.0-q8_0"]


@pytest.mark.dev
def test_outputs_point_at_the_artifacts(release):
    run, _ = release
    assert run.outputs["revision"] and len(run.outputs["revision"]) == 40
    ggufs = [run.workspace / p for p in run.outputs["gguf-paths"].splitlines()]
    assert [p.name for p in ggufs] == ["smollm2-q4_K_M.gguf", "smollm2-q8_0.gguf"]
    assert all(p.read_bytes()[:4] == b"GGUF" for p in ggufs)
    assert 80e6 < ggufs[0].stat().st_size < ggufs[1].stat().st_size < 200e6
    modelfile = (run.workspace / run.outputs["modelfile"]).read_text()
    assert "FROM ./smollm2-q4_K_M.gguf" in modelfile
    assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'PARAMETER stop "<|im_start|>"' not in modelfile
    assert "LICENSE" in modelfile and "Apache" in modelfile
    # The checkpoint's own template inserts this system prompt when a chat has none; so does the derived
    # TEMPLATE, itself (a SYSTEM line would reach the GGUF's Jinja as a system message).
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default in modelfile.split("TEMPLATE", 1)[1] and "\nSYSTEM " not in modelfile


@pytest.mark.dev
def test_summary_has_one_row_per_tag(release):
    run, _ = release
    rows = [line for line in run.summary.splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    assert all(row.rstrip().endswith("| yes, pulled back by an empty Ollama |") for row in rows)
    assert "Berlin" in run.summary


@pytest.mark.dev
def test_runs_on_ollama_0_34_3(release):
    run, _ = release
    assert "Ollama 0.34.3 is running on 127.0.0.1:" in run.stdout  # what its /api/version reports
    assert "Ollama 0.34.3." in run.summary


@pytest.mark.dev
def test_stages_are_logged_in_groups(release):
    run, _ = release
    groups = [line for line in run.stdout.splitlines() if line.startswith("::group::")]
    assert [g.split("::group::")[1][:2] for g in groups] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    assert run.stdout.count("::group::") == run.stdout.count("::endgroup::")


@pytest.mark.dev
def test_no_secret_leaks_and_the_key_file_is_gone(release):
    run, key = release
    secrets = [HF_TOKEN] + [line for line in key.splitlines() if len(line) > 20 and "-----" not in line]
    # GitHub swallows ::add-mask:: lines; everywhere else the values must be absent.
    visible_stdout = "\n".join(line for line in run.stdout.splitlines() if not line.startswith("::add-mask::"))
    assert f"::add-mask::{HF_TOKEN}" in run.stdout
    places = {"stdout": visible_stdout, "stderr": run.stderr, "outputs": run.outputs_text, "summary": run.summary}
    for folder in (run.home, run.workspace, run.runner_temp):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                places[str(path)] = path.read_bytes().decode("latin-1")
    scanned = {Path(p).name for p in places}
    assert {"smollm2-q4_K_M.gguf", "smollm2-q8_0.gguf", "Modelfile", "step_summary"} <= scanned, scanned
    for secret in secrets:
        leaked = [where for where, text in places.items() if secret in text]
        assert not leaked, f"secret found in {leaked}"
    # The action's server had a HOME of its own (removed with the scratch space): the user's is untouched.
    assert not (run.home / ".ollama").exists()


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


@pytest.mark.dev
def test_prompt_parity_passed_for_every_conversation(release):
    run, _ = release
    assert "DIFFERENT" not in run.stdout
    # SmolLM2's Jinja has no tools or thinking, so Ollama renders the TEMPLATE, and only that is checked.
    assert "Ollama renders the prompts with the Modelfile's TEMPLATE (go_template)" in run.stdout
    assert "Prompts are rendered by Ollama with the Modelfile's TEMPLATE (go_template)." in run.summary
    assert "Chat template: derived from the checkpoint's chat template (chatml family)." in run.summary
    # The plain conversations, once per release, on the TEMPLATE: the only rendering compared.
    assert parity_verdicts(run.stdout) == {(label, "go_template"): ["same"] for label in checks.CONVERSATIONS}
    parity_lines = [line for line in run.stdout.splitlines() if line.startswith("prompt parity of ")]
    assert len(parity_lines) == 1 and ":1.0.0-q4_K_M " in parity_lines[0]  # Q4_K_M is smaller than Q8_0


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
