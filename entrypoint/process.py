"""Run external tools with their output streamed to the log and a readable error on failure."""

from __future__ import annotations

import collections
import signal
import subprocess
from collections.abc import Sequence

from . import github
from .errors import PublishError


def run_logged(command: Sequence[str], *, what: str) -> None:
    """Run `command`, echoing each output line; raise PublishError with the last lines if it fails."""
    github.log(f"$ {' '.join(command)}")
    tail: collections.deque[str] = collections.deque(maxlen=30)
    # A cancellation (SIGTERM) that lands while Popen runs would leave a started tool nobody stops:
    # hold it until `proc` exists. (The tool inherits the held signal; it is stopped with SIGKILL.)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise PublishError(f"Could not start {what}: {exc}", title=f"{what} failed") from exc
    assert proc.stdout is not None
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held cancellation lands here, where it is handled
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            github.log(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (e.g. the job was cancelled): do not leave the tool running
            proc.kill()
            proc.wait()
    if code != 0:
        last = "\n".join(tail)
        raise PublishError(f"{what} exited with code {code}. Last output:\n{last}", title=f"{what} failed")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Ask a child process to exit (SIGTERM), and kill it if it has not within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
