"""Hostile repositories, through the real entrypoint, Hub (olah), Ollama and registry: a chat template
that loops, a config.json claiming an absurd vocabulary, a committed symlink, and a Hub-compatible
server of the test's own whose second listing names a file outside the repository. Each is refused by
name (never "ollama-publish crashed"), writes nothing outside the work dir and pushes nothing."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests import fault_report, servers
from tests.conftest import registry_tags

pytestmark = pytest.mark.servers
REPO = "hostile-org/SmolLM2"
# Not a speed target: a guard against a run that hangs on the repo (the action's own budget is 5 s per
# rendering). The download of the 270 MB checkpoint from loopback comes first.
HANG_GUARD_S = 300
LOOPING_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
ESCAPING_NAME = "../../escaped-from-the-download-folder.txt"


def _commit_branch(repo: Path, branch: str, change: Callable[[Path], None]) -> None:
    """A branch of the mirrored repo with `change` applied to main's files."""
    git = ["git", "-C", str(repo), "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run([*git, "checkout", "-q", "-b", branch, "main"], check=True)
    change(repo)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", branch], check=True)
    subprocess.run([*git, "checkout", "-q", "main"], check=True)


def _loop(folder: Path) -> None:
    (folder / "chat_template.jinja").write_text(LOOPING_TEMPLATE)


def _absurd_vocabulary(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 4_000_000_000}))


def _symlink(folder: Path) -> None:
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to("/etc/passwd")


@pytest.fixture(scope="module")
def hostile_repo(stack) -> str:
    repo = servers.add_model_repo(stack.mirrors, REPO, Path(os.environ["SMOLLM2_CHECKPOINT"]))
    for branch, change in (("looping-template", _loop), ("absurd-vocabulary", _absurd_vocabulary),
                           ("symlink", _symlink)):
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
    fault_report.hostile_repo_refused()
    return errors[0]


def test_a_template_that_loops_is_refused(stack, run_action, hostile_repo):
    error = _refused(stack, run_action, "looping-template")
    assert "title=Chat template refused" in error and "did not render" in error and "within 5 s" in error
    assert "template" in error  # the input that fixes it


def test_a_config_claiming_an_absurd_vocabulary_is_refused(stack, run_action, hostile_repo):
    error = _refused(stack, run_action, "absurd-vocabulary")
    assert "title=Config does not match" in error
    assert "vocab_size 4,000,000,000, but its token embedding has 49,152 rows" in error


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
    handler = type("HostileHub", (_RelayToHub,), {"upstream": upstream, "listings": listings})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", listings
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_whose_second_listing_leaves_the_repo_is_refused(stack, run_action, hostile_repo):
    with _hub_that_changes_its_listing(stack.hub_endpoint) as (endpoint, listings):
        error = _refused(stack, run_action, "main", endpoint)
    assert len(listings) >= 2, listings  # the hostile listing was served, and read
    assert "title=Unsafe file names" in error and ESCAPING_NAME in error
