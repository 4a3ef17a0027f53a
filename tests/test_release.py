"""One release, v1.0.0, published by the action's image run the way GitHub's runner runs it
(tests/container.py), from the test Hub (olah) to the test registry; watched while it runs. Its inputs are
the shipped example's (examples/release.yml: the model, quantizations and smoke-test prompt), with the
test Hub, registry and secrets in place of the real ones. Every test here only asserts on its outcome, so
they share it: one conversion, one push, one pull-back per run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import docker
import pytest
import requests
import yaml

from entrypoint import checks
from entrypoint.ollama import file_sha256
from entrypoint.quantize import tag_suffix
from tests.conftest import (HF_REPO, RUNNER_SECRETS, key_lines, make_ollama_key, parity_verdicts,
                            parse_outputs, registry_manifest, registry_tags)
from tests import servers
from tests.container import ContainerRun, Runner, secrets_left

pytestmark = [pytest.mark.servers, pytest.mark.dev]
HF_TOKEN = "hf_ReleaseTokenThatMustNeverBeLogged0123456789"
REPOSITORY = "test-team/smollm2"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "release.yml"


def _example_inputs() -> dict[str, str]:
    """The `with:` of the example's publish step."""
    steps = yaml.safe_load(EXAMPLE.read_text())["jobs"]["publish"]["steps"]
    return {name: str(value) for name, value in next(s for s in steps if s.get("id") == "publish")["with"].items()}


QUANTIZATIONS = tuple(q.strip() for q in _example_inputs()["quantizations"].split(","))
OWNER = (1001, 1001)  # the runner user's uid and gid on GitHub's hosted runners
OLLAMA_LAYERS = {"application/vnd.ollama.image.model", "application/vnd.ollama.image.template",
                 "application/vnd.ollama.image.params"}


class _Witness:
    """Watches the run from its log: when the converter starts, reads its environment from /proc (by the
    host pid Docker reports) and looks for the push key on disk; when the push starts, looks where the
    action's server reads the key."""

    def __init__(self, runner: Runner, key: str):
        # The OpenSSH header every ed25519 key shares (its first ~80 base64 characters) left out.
        self.runner, self.key_body = runner, "".join(key.splitlines()[1:-1])[100:]
        self.converter_environ: dict[str, str] | None = None
        self.key_files_while_converting: list[str] | None = None
        self.key_in_place_while_pushing: bool | None = None

    def on_line(self, line: str, container: docker.models.containers.Container) -> None:
        if line.startswith("$ ") and "convert_hf_to_gguf.py" in line and self.converter_environ is None:
            pid = None
            for _ in range(100):  # the line is logged as the tool starts
                pid = self._converter_pid(container)
                if pid:
                    break
                time.sleep(0.05)
            assert pid, "the converter's process was not found"
            raw = Path(f"/proc/{pid}/environ").read_bytes()
            self.converter_environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
            # The runner's folders the container mounts, and the container's own /tmp and HOME.
            places = [*self.runner.mounted, Path(f"/proc/{pid}/root/tmp"), Path(f"/proc/{pid}/root/root")]
            self.key_files_while_converting = self._files_holding_the_key(places)
        elif line.startswith("pushing ") and self.key_in_place_while_pushing is None:
            homes = list(self.runner.workspace.rglob(".ollama-publish-*/home/.ollama/id_ed25519"))
            self.key_in_place_while_pushing = any(self.key_body in "".join(p.read_text().splitlines()[1:-1])
                                                  for p in homes)

    @staticmethod
    def _converter_pid(container) -> int | None:
        top = container.top(ps_args="-o pid,args")
        return next((int(pid) for pid, command in top["Processes"] if "convert_hf_to_gguf.py" in command), None)

    def _files_holding_the_key(self, places: list[Path]) -> list[str]:
        found = []
        for place in places:
            for path in place.rglob("*"):
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink() and path.stat().st_size < 10**6:
                        if self.key_body[:60] in path.read_text(errors="replace").replace("\n", ""):
                            found.append(str(path))
        return found


@dataclasses.dataclass
class Release:
    run: ContainerRun
    outputs: dict[str, str]
    key: str
    witness: _Witness
    downloaded: dict[str, int]  # bytes the registry's blob store sent during the run, by blob digest (hex)

    @property
    def models(self) -> list[dict]:
        return json.loads(self.outputs["models"])


@pytest.fixture(scope="module")
def release(stack, tmp_path_factory) -> Release:
    key = make_ollama_key(tmp_path_factory.mktemp("release-key"))
    runner = Runner(tmp_path_factory.mktemp("release"), workspace_owner=OWNER)
    witness = _Witness(runner, key)
    # The example's inputs; the test Hub's repo, registry and secrets in place of the real ones.
    inputs = {**_example_inputs(), "hf-repo": HF_REPO, "hf-revision": "v1.0.0", "hf-token": HF_TOKEN,
              "ollama-key": key, "ollama-model": f"{stack.registry}/{REPOSITORY}", "insecure-registry": "true"}
    served_before = servers.SERVED_BYTES.copy()
    run = runner.run(inputs, env={"HF_ENDPOINT": stack.hub_endpoint, **RUNNER_SECRETS}, on_line=witness.on_line)
    served = servers.SERVED_BYTES - served_before
    print(run.stdout[-4000:], run.stderr[-2000:])
    assert run.exit_code == 0, run.stdout[-3000:] + run.stderr[-2000:]
    # The registry's blob paths end in .../sha256/<2 hex>/<hex>/data.
    downloaded = {Path(path).parent.name: count for path, count in served.items()}
    return Release(run=run, outputs=parse_outputs(run.outputs_text), key=key, witness=witness, downloaded=downloaded)


def test_the_release_is_the_shipped_examples():
    """The example publishes the model the test Hub serves as HF_REPO (from its own repository), and asks
    for more than one quantization, each of which must pass its smoke test below."""
    example = _example_inputs()
    assert example["hf-repo"] == "HuggingFaceTB/" + HF_REPO.split("/")[1]
    assert len(QUANTIZATIONS) > 1 and example["smoke-test-prompt"]


def test_every_tag_is_created_pushed_and_pulled_back(release, stack):
    assert release.run.errors() == []
    assert [(m["tag"], m["quantization"]) for m in release.models] == [
        ("1.0.0-q4_K_M", "Q4_K_M"), ("1.0.0-q8_0", "Q8_0"), ("1.0.0", "Q4_K_M"), ("latest", "Q4_K_M")]
    assert all(m["pushed"] and m["pulled"] for m in release.models)
    assert all(m["name"] == f"{stack.registry}/{REPOSITORY}:{m['tag']}" for m in release.models)
    assert sorted(registry_tags(stack.registry, REPOSITORY)) == sorted(m["tag"] for m in release.models)
    # The empty Ollama pulled every tag and answered once per quantization.
    pulled = [line.split(":")[0] for line in release.run.stdout.splitlines()
              if "pulled by an empty Ollama, same blobs; " in line]
    assert sorted(pulled) == sorted(QUANTIZATIONS)


def test_the_pull_back_downloads_all_but_the_weights_the_registry_proves(release, stack):
    """The empty Ollama downloads each tag's config and small layers through the registry's redirect, as a
    user's would, and takes the weights (proven by the registry's digest and size) from our Ollama."""
    weights, small = set(), set()
    for model in release.models:
        manifest = registry_manifest(stack.registry, REPOSITORY, model["tag"])[1]
        small.add(manifest["config"]["digest"])
        for layer in manifest["layers"]:
            (weights if layer["mediaType"] == "application/vnd.ollama.image.model" else small).add(layer["digest"])
    assert len(weights) == len(QUANTIZATIONS) and len(small) > len(QUANTIZATIONS)
    downloaded = {"sha256:" + digest for digest, count in release.downloaded.items() if count}
    assert small <= downloaded and not weights & downloaded, (small, weights, release.downloaded)
    not_again = [line for line in release.run.stdout.splitlines() if "were not downloaded again" in line]
    assert len(not_again) == len(QUANTIZATIONS), not_again


def test_each_quantization_answers_and_stops(release):
    assert all("Berlin" in m["answer"] for m in release.models), release.models
    # The smoke test asks each quantization once (aliases are the same model), and once more pulled back by
    # the empty Ollama; each stopped by itself.
    assert release.run.stdout.count("(done_reason: stop)") == 2 * len(QUANTIZATIONS)
    assert "(done_reason: length)" not in release.run.stdout


def test_registry_holds_exactly_the_published_files(release, stack):
    """Each tag's manifest: the model layer is the GGUF left in output-dir, byte for byte; the template
    and parameters layers are the Modelfile's."""
    ggufs = {Path(p).name: release.run.workspace / p for p in release.outputs["gguf-paths"].splitlines()}
    modelfile = (release.run.workspace / release.outputs["modelfile"]).read_text()
    for model in release.models:
        digest, remote = registry_manifest(stack.registry, REPOSITORY, model["tag"])
        assert digest == model["registry_digest"]
        layers = {layer["mediaType"]: layer["digest"] for layer in remote["layers"]}
        assert OLLAMA_LAYERS <= set(layers)
        gguf = ggufs[f"smollm2-{tag_suffix(model['quantization'])}.gguf"]
        assert layers["application/vnd.ollama.image.model"] == "sha256:" + file_sha256(gguf)
        blob = f"http://{stack.registry}/v2/{REPOSITORY}/blobs/"
        template = requests.get(blob + layers["application/vnd.ollama.image.template"], timeout=10).text
        assert f'TEMPLATE """{template}"""' in modelfile
        params = requests.get(blob + layers["application/vnd.ollama.image.params"], timeout=10).json()
        assert params["stop"] == ["<|im_end|>"]
    # The GGUFs were handed to the action's Ollama as hard links, not uploaded as copies.
    linked = [line.split()[0] for line in release.run.stdout.splitlines() if line.endswith("(hard link, no copy)")]
    assert sorted(linked) == sorted(ggufs)
    # Aliases point at the same manifest as the version tag they alias.
    by_tag = {m["tag"]: m["digest"] for m in release.models}
    assert by_tag["1.0.0"] == by_tag["latest"] == by_tag["1.0.0-q4_K_M"] != by_tag["1.0.0-q8_0"]


def test_outputs_name_the_artifacts_in_the_checkout(release):
    """Paths in the checkout, as later steps on the runner see them."""
    assert release.outputs["revision"] and len(release.outputs["revision"]) == 40
    ggufs = [release.run.workspace / p for p in release.outputs["gguf-paths"].splitlines()]
    assert [p.name for p in ggufs] == [f"smollm2-{tag_suffix(q)}.gguf" for q in QUANTIZATIONS]
    assert all(p.read_bytes()[:4] == b"GGUF" for p in ggufs)
    assert 80e6 < ggufs[0].stat().st_size < ggufs[1].stat().st_size < 200e6
    modelfile = (release.run.workspace / release.outputs["modelfile"]).read_text()
    assert modelfile.startswith("# Modelfile written by ollama-publish")
    assert "FROM ./smollm2-q4_K_M.gguf" in modelfile
    assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'PARAMETER stop "<|im_start|>"' not in modelfile
    assert "LICENSE" in modelfile and "Apache" in modelfile
    # The checkpoint's own template inserts this system prompt when a chat has none; so does the derived
    # TEMPLATE, itself (a SYSTEM line would reach the GGUF's Jinja as a system message).
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default in modelfile.split("TEMPLATE", 1)[1] and "\nSYSTEM " not in modelfile


def test_prompt_parity_passed_for_every_conversation(release):
    stdout, summary = release.run.stdout, release.run.summary
    assert "DIFFERENT" not in stdout
    # SmolLM2's Jinja has no tools or thinking, so Ollama renders the TEMPLATE, and only that is checked.
    assert "Ollama renders the prompts with the Modelfile's TEMPLATE (go_template)" in stdout
    assert "Prompts are rendered by Ollama with the Modelfile's TEMPLATE (go_template)." in summary
    assert "Chat template: derived from the checkpoint's chat template (chatml family)." in summary
    # The plain conversations, once per release, on the TEMPLATE: the only rendering compared.
    assert parity_verdicts(stdout) == {(label, "go_template"): ["same"] for label in checks.CONVERSATIONS}
    parity_lines = [line for line in stdout.splitlines() if line.startswith("prompt parity of ")]
    assert len(parity_lines) == 1 and ":1.0.0-q4_K_M " in parity_lines[0]  # Q4_K_M is smaller than Q8_0


def test_the_log_has_a_group_per_stage_and_the_summary_a_row_per_tag(release):
    stdout, summary = release.run.stdout, release.run.summary
    groups = [line for line in stdout.splitlines() if line.startswith("::group::")]
    assert [g.split("::group::")[1][:2] for g in groups] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    assert stdout.count("::group::") == stdout.count("::endgroup::")
    assert "Ollama 0.34.3 is running on 127.0.0.1:" in stdout  # what its /api/version reports
    assert "Ollama 0.34.3." in summary
    rows = [line for line in summary.splitlines() if line.startswith("| `")]
    assert len(rows) == len(release.models)
    assert all(row.rstrip().endswith("| yes, pulled back by an empty Ollama |") for row in rows)
    assert "Berlin" in summary


def test_the_converter_sees_none_of_the_runs_secrets(release):
    """Read from /proc while it ran: no ACTIONS_* or GitHub token, no Hub token or endpoint, no input; offline."""
    environ = release.witness.converter_environ
    assert environ is not None
    assert not [name for name in environ if name.startswith(("ACTIONS_", "GITHUB_", "INPUT_", "RUNNER_"))], environ
    assert "HF_ENDPOINT" not in environ and "HF_TOKEN" not in environ
    secrets = [HF_TOKEN, *RUNNER_SECRETS.values(), "".join(release.key.splitlines()[1:-1])[100:160]]
    assert not [secret for secret in secrets if secret in json.dumps(environ)]
    assert environ["HF_HUB_OFFLINE"] == environ["TRANSFORMERS_OFFLINE"] == "1"


def test_the_push_key_is_on_disk_only_while_pushing(release):
    # Nowhere in the runner's folders or the container's /tmp and HOME while the converter runs.
    assert release.witness.key_files_while_converting == []
    assert release.witness.key_in_place_while_pushing is True
    assert not list(release.run.workspace.rglob("id_ed25519*"))  # removed with the scratch space
    assert not list(release.run.home.rglob("id_ed25519*"))


def test_no_secret_is_left_anywhere(release):
    """Not in stdout (the ::add-mask:: lines GitHub swallows aside), stderr, outputs, summary, or any file
    the container left in the runner's folders."""
    run = release.run
    assert f"::add-mask::{HF_TOKEN}" in run.stdout
    secrets = [HF_TOKEN, *RUNNER_SECRETS.values(), *key_lines(release.key)]
    assert secrets_left(run, secrets) == []
    # Every file was read: the outputs, the Modelfile, the event, the output and summary files.
    scanned = {path.name for folder in run.mounted for path in folder.rglob("*") if path.is_file()}
    assert {"smollm2-q4_K_M.gguf", "smollm2-q8_0.gguf", "Modelfile", "event.json"} <= scanned, scanned
    for prefix in ("step_summary_", "set_output_"):
        assert any(name.startswith(prefix) for name in scanned), prefix
    # The action's server had a HOME of its own (removed with the scratch space): the runner's is untouched.
    assert not (run.home / ".ollama").exists()


def test_files_left_in_the_checkout_belong_to_its_owner(release):
    """Later steps run as the runner's user: what the container (root) wrote must be theirs to delete.
    (Last in this file: it deletes the outputs the tests above read.)"""
    left = list(release.run.workspace.rglob("*"))
    assert left, "the container wrote nothing into the checkout"
    assert [p for p in left if (p.lstat().st_uid, p.lstat().st_gid) != OWNER] == []

    def as_runner_user():
        os.setgid(OWNER[1])
        os.setuid(OWNER[0])

    output_dir = release.run.workspace / "ollama-publish-out"
    subprocess.run(["rm", "-r", str(output_dir)], preexec_fn=as_runner_user, check=True)
    assert not output_dir.exists()
