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
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import github
from .errors import DiskFull, ToolFailed

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


def run_logged(command: Sequence[str], *, what: str, writes_to: Path) -> None:
    """Run `command`, echoing each output line; raise ToolFailed with the last lines if it fails, or
    DiskFull when the filesystem it writes to (the folder `writes_to`) is full by then."""
    github.log(f"$ {' '.join(command)}")
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with running(command, what=what, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            github.log(line)
        code = proc.wait()
    if code != 0:
        free = shutil.disk_usage(writes_to).free
        if free < NEARLY_FULL_BYTES:
            raise DiskFull(writes_to, free=free, what=what)
        last = "\n".join(tail)
        raise ToolFailed(f"{what} exited with code {code}. Last output:\n{last}", tool=what, exit_code=code)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Ask a child process to exit (SIGTERM), and kill it if it has not within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
