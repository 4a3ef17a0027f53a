"""GitHub Actions I/O: workflow commands on stdout, step outputs and the job summary.

Everything the action prints goes through `log` and friends, which remove registered secret values
first, so a secret cannot reach the log even if it shows up in a subprocess's output. And only the
action's own workflow commands are commands: the runner obeys any line that starts with `::` (after
leading spaces) or holds `##[`, and plain text (a repository's files and names, tools' and servers'
output, model answers) could say `::add-mask::` or `::stop-commands::`. `log` neutralises such lines with
an invisible character the runner does not trim.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_secrets: list[str] = []


def register_secret(value: str) -> None:
    """Ask GitHub to mask `value` (each line separately) and scrub it from everything we print."""
    for line in value.splitlines():
        line = line.strip()
        if len(line) >= 4 and line not in _secrets:
            _secrets.append(line)
            # The mask command itself must carry the value; GitHub hides the line.
            sys.stdout.write(f"::add-mask::{line}\n")
    sys.stdout.flush()


def redact(text: str) -> str:
    for value in _secrets:
        text = text.replace(value, "***")
    return text


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


# A long transfer logs a line at most this often: often enough to see it move, not a flood at 70B.
PROGRESS_EVERY_S = 30
_NOT_A_COMMAND = "\u200b"  # zero-width space: not whitespace to the runner's TrimStart, invisible in the log


def neutralise(line: str) -> str:
    """A line the runner shows as it is and never runs as a workflow command (v2 `::name::`, v1 `##[name]`)."""
    if line.lstrip().startswith("::"):
        line = _NOT_A_COMMAND + line
    return line.replace("##[", f"##{_NOT_A_COMMAND}[")


def log(message: str = "") -> None:
    """Print text, never as a workflow command."""
    # The runner reads a line as ending at \n, \r\n or a lone \r.
    lines = redact(message).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    _emit("\n".join(neutralise(line) for line in lines))


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def warning(message: str) -> None:
    _emit(f"::warning::{_escape_data(redact(message))}")


def error(message: str, title: str | None = None) -> None:
    props = f" title={_escape_property(redact(title))}" if title else ""
    _emit(f"::error{props}::{_escape_data(redact(message))}")


def readme_link(anchor: str) -> str:
    """Where the action's README explains `anchor`: a URL at the ref the workflow uses, when
    scripts/select-image knew it (OLLAMA_PUBLISH_README), else the file's name in the action's repository."""
    return f"{os.environ.get('OLLAMA_PUBLISH_README') or 'README.md'}#{anchor}"


@contextlib.contextmanager
def group(name: str) -> Iterator[None]:
    _emit(f"::group::{_escape_data(name)}")
    try:
        yield
    finally:
        _emit("::endgroup::")


def set_outputs(outputs: dict[str, str]) -> None:
    """Append outputs to $GITHUB_OUTPUT (multi-line values use a random delimiter)."""
    path = os.environ.get("GITHUB_OUTPUT")
    if not path:
        for name, value in outputs.items():
            log(f"output {name}={value}")
        return
    with open(path, "a", encoding="utf-8") as f:
        for name, value in outputs.items():
            value = redact(value)
            if "\n" in value:
                delimiter = f"ghadelimiter_{secrets.token_hex(8)}"
                f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
            else:
                f.write(f"{name}={value}\n")


def give_to_workspace_owner(folder: Path, workspace: Path) -> None:
    """Give what the action wrote in `folder` (in the workspace, with the folders between) to the
    workspace's owner. A container action runs as root, and later steps run as the runner's user: they
    could not change or delete files owned by root (actions/runner#434)."""
    owner = workspace.stat()
    if os.geteuid() != 0 or owner.st_uid == 0 or not folder.is_dir():
        return
    between = folder.relative_to(workspace).parents  # a/b for output-dir a/b/out, without the workspace
    paths = [workspace / p for p in between if p != Path(".")]
    for root, dirs, files in os.walk(folder):
        paths += [Path(root)] + [Path(root, name) for name in dirs + files]
    for path in paths:
        os.lchown(path, owner.st_uid, owner.st_gid)


def write_summary(markdown: str) -> None:
    """Append Markdown to the job summary ($GITHUB_STEP_SUMMARY), or print it when run locally."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    text = redact(markdown)
    if not path:
        log(text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")


class Progress:
    """A long transfer's progress: a line at most every PROGRESS_EVERY_S seconds with the bytes done, the
    rate and the time left, and one when it ends."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.start = self.last = time.monotonic()
        self.ended = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.ended or (done < self.total and now - self.last < PROGRESS_EVERY_S):
            return
        self.last, self.ended = now, done >= self.total
        rate = done / max(now - self.start, 1e-3)
        speed = f", {rate / 1e6:.0f} MB/s" if now - self.start >= 1 else ""
        if self.ended:
            log(f"{self.what}: {_size(self.total)} done{speed}")
        else:
            left = (self.total - done) / rate if rate else float("inf")
            log(f"{self.what}: {_size(done)} of {_size(self.total)}{speed}, about {_duration(left)} left")


def _size(nbytes: int) -> str:
    if nbytes >= 10**9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 10**5 else f"{nbytes:,} bytes"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
