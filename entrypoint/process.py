"""Start external tools so that none outlives the run, stream their output, and handle cancellation.

GitHub cancels a job with SIGTERM. `on_cancel` turns it into SystemExit so every `finally` (stop the
tools and the server, remove the key and the scratch folder) runs. While a tool is being started it only
takes note: unwinding inside Popen, after the fork, would lose the tool's handle and orphan it. Blocking
the signal is not enough for that, because the kernel hands a process-wide signal to any thread that does
not block it (tqdm's monitor thread, for one), and Python then runs the handler in the main thread
wherever it happens to be.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from . import github
from .errors import DiskFull, LimitExceeded, RemoteCodeRefused, ToolFailed, ToolRaised

_starting_tool = False
_cancelled_by: int | None = None  # the first cancellation signal received


def on_cancel(signum, frame) -> None:
    """SIGTERM handler: unwind with exit code 128+signum, once; later signals must not cut cleanup short."""
    global _cancelled_by
    if _cancelled_by is not None:
        return
    _cancelled_by = signum
    if not _starting_tool:
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def running(command: Sequence[str], *, what: str, **popen_options) -> Iterator[subprocess.Popen]:
    """Start `command` for the duration of the block; whatever ends the block, the tool does not outlive it."""
    global _starting_tool
    _starting_tool = True
    try:
        proc = subprocess.Popen(list(command), **popen_options)
    except BaseException as exc:
        _starting_tool = False
        if isinstance(exc, OSError):
            raise ToolFailed(f"Could not start {what}: {exc}", tool=what, exit_code=None) from exc
        raise
    try:
        _starting_tool = False  # only here, where an unwinding run is sure to stop the tool
        if _cancelled_by is not None:  # cancelled while starting
            raise SystemExit(128 + _cancelled_by)
        yield proc
    finally:
        stop(proc)


# Below this, a tool that failed while writing most likely ran out of disk: say so, with the numbers.
NEARLY_FULL_BYTES = 64 * 1024 * 1024

SEALED = Path(__file__).with_name("sealed.py")  # the launcher every tool that reads the repository runs behind
PR_SET_DUMPABLE = 4
SEALED_STOPPED = 113  # sealed.py's exit code when the seal or a limit stopped the program (sealed.EXIT_STOPPED)
APP_ROOT = Path(__file__).resolve().parent.parent  # where the entrypoint package lives
# What a sealed process gets of our environment; nothing else (no tokens, no ACTIONS_*, no HF_ENDPOINT).
SEALED_PASSES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
NOWHERE = Path("/nonexistent")  # HOME for a sealed process that writes no file


@dataclasses.dataclass(frozen=True)
class Seal:
    """How the tools that read one repository run: at most `memory_bytes` of memory each
    (preflight.tool_memory), and `input_name`, the input that named the repository, takes their refusals."""

    memory_bytes: int
    input_name: str


def keep_secrets_from_children() -> None:
    """Make this process non-dumpable: its memory and its /proc files, the environment among them (where the
    runner put the inputs, secrets included, before they were read), become readable only with
    CAP_SYS_PTRACE, which a container action's processes do not have. A sealed tool, even one that ran
    code, cannot read them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def sealed_environment(home: Path) -> dict[str, str]:
    """The whole environment of a sealed process: the allow-list above, `home` as HOME and every cache, and
    the Hub libraries offline (the seal refuses any connection anyway; offline, they do not try)."""
    environment = {name: os.environ[name] for name in SEALED_PASSES if name in os.environ}
    return {**environment, "HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / "cache"),
            "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def sealed_command(command: Sequence[str], *, how: str, report: Path | None, memory_bytes: int | None,
                   code_roots: Sequence[Path] = (), writable: Sequence[Path] = ()) -> list[str]:
    """`command` behind the launcher (sealed.py): `how` is "exec" (a program), "python-script" (command[0]
    is a script) or "python-module" (command[0] is a module under `code_roots`); it may write only beneath
    `writable` (and /dev)."""
    launcher = [sys.executable, "-I", str(SEALED), f"--{how}"]
    if report is not None:
        launcher += ["--report", str(report)]
    if memory_bytes is not None:
        launcher += ["--memory", str(memory_bytes)]
    for root in code_roots:
        launcher += ["--code-root", str(root)]
    for folder in writable:
        launcher += ["--writable", str(folder)]
    return [*launcher, "--", *command]


def run_sealed(command: Sequence[str], *, what: str, writes_to: Path, seal: Seal, python: bool = False,
               code_roots: Sequence[Path] = ()) -> None:
    """Run a tool that reads the repository's files, sealed (sealed.py): offline, with an allow-listed
    environment, HOME in a folder of its own under `writes_to` (removed after), writing only beneath
    `writes_to`, and the seal's memory limit. `python`: command[0] is a Python script, run by this
    interpreter; `code_roots`: command[0] is a Python module under the first, and its code and libraries
    may come from these folders only.

    Raises RemoteCodeRefused when the seal stopped it, LimitExceeded past its memory (a Python tool says
    so), ToolRaised when a Python tool raised, else DiskFull or ToolFailed when it failed."""
    home = Path(tempfile.mkdtemp(prefix=".sealed-", dir=writes_to))
    report = home / "stopped.json"
    try:
        how = "python-module" if code_roots else "python-script" if python else "exec"
        sealed = sealed_command(command, how=how, report=report, memory_bytes=seal.memory_bytes,
                                code_roots=code_roots, writable=[writes_to])
        code, tail = _run_logged(sealed, what, shown=command, env=sealed_environment(home))
        stopped = _read_report(report)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if stopped is None and code == 0:
        return
    kind, detail = stopped or ("", "")
    limit = f"{seal.memory_bytes / 2**30:.1f} GiB"
    if kind in ("code", "network"):
        attempt = (f"to run code the repository brings ({detail})" if kind == "code" else
                   f"to reach the network ({detail})")
        raise RemoteCodeRefused(f"{what} tried {attempt} and was stopped before it could: nothing that reads a "
                                "repository runs its code or goes online here. Publish a checkpoint saved with the "
                                "classes transformers ships (no auto_map in its config or tokenizer files).",
                                attempt=kind, input_name=seal.input_name)
    if kind == "memory":
        raise LimitExceeded(f"{what} needed more than its memory limit of {limit}, which follows from the "
                            "checkpoint's largest tensor: a config.json that claims more than the weights hold "
                            "(a vocabulary, layers) makes the converter build that much. A genuine checkpoint "
                            "that needs more needs a runner with more memory.", resource="memory",
                            limit=seal.memory_bytes, input_name=seal.input_name, title=f"{what}: memory limit")
    free = shutil.disk_usage(writes_to).free
    if free < NEARLY_FULL_BYTES:
        raise DiskFull(writes_to, free=free, what=what)
    if kind == "exception":
        raise ToolRaised(f"{what} could not read the repository's files: {detail}. The checkpoint is malformed, or "
                         "uses something this converter does not support (its output is in the log above).",
                         tool=what, exception=detail, input_name=seal.input_name)
    last = "\n".join(tail)
    raise ToolFailed(f"{what} exited with code {code} (it may use {limit} of memory). Last output:\n{last}",
                     tool=what, exit_code=code)


def _read_report(path: Path) -> tuple[str, str] | None:
    """What sealed.py wrote when it stopped the tool: (kind, detail), or None."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        return str(report["kind"]), str(report["detail"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # written by the tool itself, then: it was not stopped cleanly
        return "exception", "the tool's report of its failure is unreadable"


def _run_logged(command: Sequence[str], what: str, shown: Sequence[str], env: Mapping[str, str]
                ) -> tuple[int, list[str]]:
    """Run `command` (logged as `shown`), echoing each output line; its exit code and last lines."""
    github.log(f"$ {' '.join(shown)}")
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with running(command, what=what, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 errors="replace", bufsize=1, env=dict(env)) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            github.log(line)
        code = proc.wait()
    return code, list(tail)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Ask a child process to exit (SIGTERM), and kill it if it has not within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
