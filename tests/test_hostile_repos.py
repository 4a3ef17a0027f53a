"""Hostile repositories, through the real entrypoint, Hub (olah), Ollama and registry: chat templates that
loop, cost CPU while compiling or ask for gigabytes (refused before any weights are downloaded), configs
claiming absurd sizes (whatever the tensors are called), committed symlinks (one named like a GGUF file),
malformed files under every name the action reads (from model-path), and a Hub-compatible server of the
test's own whose second listing names a file outside the repository. Each is refused by name (never
"ollama-publish crashed"), within seconds of its limit, writes nothing outside the work dir and pushes
nothing."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests import fault_report, servers
from tests.conftest import registry_tags

pytestmark = pytest.mark.servers
REPO = "hostile-org/SmolLM2"
# Not a speed target: a guard against a run that hangs on the repo (the action's own limit is 5 CPU seconds
# per rendering). The download of the 270 MB checkpoint from loopback comes first for the refusals that
# read the weights' headers.
HANG_GUARD_S = 300
LOOPING_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# Jinja folds a constant expression while compiling the template: a huge power is computed there, in C.
COMPILING_TEMPLATE = "{{ 99 ** 99999999 }}{% for m in messages %}{{ m.content }}{% endfor %}"
ALLOCATING_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}{{ 'a' * 10**10 }}"
ESCAPING_NAME = "../../escaped-from-the-download-folder.txt"


def _commit_branch(repo: Path, branch: str, change: Callable[[Path], None]) -> None:
    """A branch of the mirrored repo with `change` applied to main's files."""
    git = ["git", "-C", str(repo), "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    # -f: the mirror is committed without a working tree (servers.add_model_repo); this writes main's files.
    subprocess.run([*git, "checkout", "-q", "-f", "-b", branch, "main"], check=True)
    change(repo)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", branch], check=True)
    subprocess.run([*git, "checkout", "-q", "main"], check=True)


def _template(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "chat_template.jinja").write_text(text)


def _renamed_embedding(folder: Path) -> None:
    """The token embedding under a name no architecture uses (same length: the header keeps its size), and a
    config.json that claims an absurd vocabulary."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = bytes(data[8:8 + length])
    assert b"model.embed_tokens.weight" in header
    data[8:8 + length] = header.replace(b"model.embed_tokens.weight", b"model.vocab_matrix.weight")
    weights.write_bytes(data)
    _absurd_vocabulary(folder)


def _gguf_symlink(folder: Path) -> None:
    """A GGUF repo: its only GGUF is a link (served by the Hub as the text of its target)."""
    for path in folder.iterdir():
        if path.name.endswith(".safetensors"):
            path.unlink()
    (folder / "SmolLM2-Q8_0.gguf").symlink_to("/etc/passwd")


def _absurd_vocabulary(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 4_000_000_000}))


def _symlink(folder: Path) -> None:
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to("/etc/passwd")


@pytest.fixture(scope="module")
def hostile_repo(stack) -> str:
    repo = servers.add_model_repo(stack.mirrors, REPO, Path(os.environ["SMOLLM2_CHECKPOINT"]))
    for branch, change in (("looping-template", _template(LOOPING_TEMPLATE)),
                           ("compiling-template", _template(COMPILING_TEMPLATE)),
                           ("allocating-template", _template(ALLOCATING_TEMPLATE)),
                           ("absurd-vocabulary", _absurd_vocabulary), ("renamed-embedding", _renamed_embedding),
                           ("symlink", _symlink), ("gguf-symlink", _gguf_symlink)):
        _commit_branch(repo, branch, change)
    return REPO


def _refused(stack, run_action, revision: str, endpoint: str = "") -> str:
    """Run the action on the hostile revision; return its one error line, after the checks every
    refusal must pass."""
    repository = f"hostile/{revision}"
    start = time.monotonic()
    run = run_action({"hf-repo": REPO, "hf-revision": revision, "ollama-model": f"{stack.registry}/{repository}",
                      "insecure-registry": "true", "quantizations": "Q8_0"},
                     env={"HF_ENDPOINT": endpoint or stack.hub_endpoint})
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1, errors
    assert "crashed" not in errors[0] and "Traceback" not in run.stdout, run.stdout[-3000:]
    assert elapsed < HANG_GUARD_S, f"refused only after {elapsed:.0f} s"
    assert registry_tags(stack.registry, repository) == []
    assert not list(run.workspace.parent.rglob(Path(ESCAPING_NAME).name))
    _assert_nothing_left(run)
    if "template" in revision:  # a template is checked on the repository's other files, before any weights
        assert "downloading model.safetensors" not in run.stdout and "stream from the Hub" not in run.stdout
        assert "convert_hf_to_gguf" not in run.stdout
    fault_report.hostile_repo_refused()
    return errors[0]


def _assert_nothing_left(run) -> None:
    """Nothing outside the work dir: the runner's HOME and RUNNER_TEMP hold no file the run wrote (bar the
    step's own output and summary files), and the scratch space in output-dir is gone."""
    written = [p for folder in (run.home, run.runner_temp) for p in folder.rglob("*")
               if p.is_file() and p.name not in ("github_output", "step_summary")]
    assert written == [], written
    assert not list(run.workspace.rglob(".ollama-publish-*"))


@pytest.mark.parametrize("revision, limit", [("looping-template", "more than 5 CPU seconds"),
                                             ("compiling-template", "more than 5 CPU seconds"),
                                             ("allocating-template", "more than 512 MiB of memory")])
def test_a_template_past_its_limits_is_refused_before_any_weights(stack, run_action, hostile_repo, revision, limit):
    error = _refused(stack, run_action, revision)
    assert "title=Chat template refused" in error and "chat_template.jinja: The checkpoint's chat template" in error
    assert limit in error and "Set the template input" in error
    fault_report.limit_enforced()


def test_a_config_claiming_an_absurd_vocabulary_is_refused(stack, run_action, hostile_repo):
    error = _refused(stack, run_action, "absurd-vocabulary")
    assert "title=Config does not match" in error
    assert "vocab_size 4,000,000,000, but its token embedding has 49,152 rows" in error


def test_a_config_is_bounded_by_the_weights_whatever_the_embedding_is_called(stack, run_action, hostile_repo):
    error = _refused(stack, run_action, "renamed-embedding")
    assert "title=Config does not match" in error
    assert "vocab_size 4,000,000,000, but no tensor of its weights has a dimension over 49,152" in error


def test_a_link_named_like_a_gguf_file_is_refused(stack, run_action, hostile_repo):
    error = _refused(stack, run_action, "gguf-symlink")
    assert "title=Bad GGUF file" in error and "SmolLM2-Q8_0.gguf is not a valid GGUF file" in error


def test_a_committed_symlink_is_refused(stack, run_action, hostile_repo):
    error = _refused(stack, run_action, "symlink")
    # The Hub serves a link as its target's path: the file arrives as text, never as the target itself.
    assert "tokenizer_config.json" in error and "title=Bad checkpoint" in error


class _RelayToHub(http.server.BaseHTTPRequestHandler):
    """Relays requests to a Hub; after the first file listing, every listing also names ESCAPING_NAME."""
    upstream: str
    listings: list[str]

    def do_HEAD(self) -> None:
        self._relay()

    def do_GET(self) -> None:
        self._relay()

    def _relay(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
        answer = requests.request(self.command, self.upstream + self.path, headers=headers, allow_redirects=False,
                                  timeout=60)
        body = answer.content
        listing = self.path.startswith("/api/models/") and ("/revision/" in self.path or "/tree/" in self.path)
        if listing and answer.ok:
            self.listings.append(self.path)
            if len(self.listings) > 1:
                body = json.dumps(self._with_escaping_name(json.loads(body))).encode()
        self.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    @staticmethod
    def _with_escaping_name(listing):
        if isinstance(listing, list):  # a tree: entries with paths
            return [*listing, {"type": "file", "path": ESCAPING_NAME, "size": 12, "oid": "0" * 40}]
        return {**listing, "siblings": [*listing.get("siblings", []), {"rfilename": ESCAPING_NAME}]}

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _hub_that_changes_its_listing(upstream: str) -> Iterator[tuple[str, list[str]]]:
    listings: list[str] = []
    with servers.loopback(type("HostileHub", (_RelayToHub,), {"upstream": upstream, "listings": listings})) as port:
        yield f"http://127.0.0.1:{port}", listings


def test_a_hub_whose_second_listing_leaves_the_repo_is_refused(stack, run_action, hostile_repo):
    with _hub_that_changes_its_listing(stack.hub_endpoint) as (endpoint, listings):
        error = _refused(stack, run_action, "main", endpoint)
    assert len(listings) >= 2, listings  # the hostile listing was served, and read
    assert "title=Unsafe file names" in error and ESCAPING_NAME in error


def _malformed(path: Path, content: bytes | str | None) -> None:
    """Replace a file of a model-path copy (the weights are hard links: replaced, never written through)."""
    path.unlink(missing_ok=True)
    if content is None:
        path.symlink_to("/proc/self/environ")  # a link out of the folder, as git clones bring them
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)


GARBAGE = b"\xff\xfe\x00GGUF\x9c not text \x80\x81"


@pytest.mark.parametrize("name, content, named", [
    ("config.json", GARBAGE, "config.json in the checkpoint is not UTF-8 text"),
    ("config.json", "[1, 2]", "config.json in the checkpoint is not a JSON object"),
    ("config.json", '{"architectures": ["LlamaForCausalLM"], "text_config": [1]}',
     "config.json in the checkpoint is malformed"),
    ("tokenizer_config.json", GARBAGE, "tokenizer_config.json in the checkpoint is not UTF-8 text"),
    ("tokenizer_config.json", '{"added_tokens_decoder": [1, 2]}',
     "tokenizer_config.json in the checkpoint is malformed"),
    ("tokenizer.json", '{"added_tokens": [{"id": "seven"}]}', "tokenizer.json in the checkpoint is malformed"),
    ("tokenizer.json", "[" * 100_000, "tokenizer.json in the checkpoint is not valid JSON"),
    ("generation_config.json", '{"eos_token_id": {"not": "an id"}}',
     "generation_config.json in the checkpoint is malformed"),
    ("chat_template.jinja", GARBAGE, "chat_template.jinja in the checkpoint is not UTF-8 text"),
    # Read when there is no chat_template.jinja, which the test's checkpoint has: taken away for these.
    ("chat_template.json", '{"chat_template": [3]}', "chat_template.json in the checkpoint is malformed"),
    ("tokenizer_config.json", '{"chat_template": 42}', "tokenizer_config.json in the checkpoint is malformed"),
    ("model.safetensors", GARBAGE, "model.safetensors is not a safetensors file"),
    ("LICENSE", None, "links that lead out of it: LICENSE"),
    ("tokenizer_config.json", None, "links that lead out of it: tokenizer_config.json"),
])
def test_a_malformed_file_is_refused_naming_it(stack, run_action, name, content, named):
    """From model-path: each file the action reads, malformed (not text, not the JSON its format has, values of
    other types, a link out of the folder): one refusal that names it, never a crash."""
    folder = run_action.workspace / "checkpoint"
    shutil.copytree(os.environ["SMOLLM2_CHECKPOINT"], folder, copy_function=os.link)
    _malformed(folder / name, content)
    if "chat_template" in str(content) or name == "chat_template.json":
        (folder / "chat_template.jinja").unlink()
    repository = f"malformed/{name.replace('.', '-').lower()}"
    start = time.monotonic()
    run = run_action({"model-path": "checkpoint", "ollama-model": f"{stack.registry}/{repository}",
                      "insecure-registry": "true", "quantizations": "Q8_0"})
    assert run.returncode == 1, run.stdout[-3000:]
    errors = run.errors()
    assert len(errors) == 1 and "crashed" not in errors[0] and "Traceback" not in run.stdout, run.stdout[-3000:]
    assert named in errors[0] and "(input: model-path)" in errors[0], errors[0]
    assert time.monotonic() - start < HANG_GUARD_S
    assert "convert_hf_to_gguf" not in run.stdout  # refused before the converter reads anything
    assert registry_tags(stack.registry, repository) == []
    _assert_nothing_left(run)
    fault_report.hostile_repo_refused()
