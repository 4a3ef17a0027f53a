"""Starting and stopping tools (real child processes), and cancellation landing at the worst moment."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from entrypoint import process
from entrypoint.errors import DiskFull, ToolFailed
from tests import servers


@pytest.fixture
def cancel_handler(monkeypatch):
    monkeypatch.setattr(process, "_cancelled_by", None)
    previous = signal.signal(signal.SIGTERM, process.on_cancel)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_cancellation_inside_popen_still_stops_the_tool(cancel_handler):
    """SIGTERM handled right after the fork, before Popen returns: the tool must not be orphaned."""
    started: list[int] = []

    def cancel_once_forked(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "_execute_child" and not started:
            started.append(frame.f_locals["self"].pid)
            signal.raise_signal(signal.SIGTERM)

    sys.setprofile(cancel_once_forked)
    try:
        with pytest.raises(SystemExit) as exit_info:
            with process.running(["sleep", "300"], what="sleep"):
                sys.setprofile(None)
                pytest.fail("the block ran although the run was cancelled")
    finally:
        sys.setprofile(None)
    assert started, "the profile hook never saw the fork"
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not Path(f"/proc/{started[0]}").exists(), "the tool still runs (or was never reaped)"


def test_later_signals_do_not_cut_cleanup_short(cancel_handler):
    with pytest.raises(SystemExit):
        process.on_cancel(signal.SIGTERM, None)
    assert process.on_cancel(signal.SIGTERM, None) is None


def test_tool_stopped_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with process.running(["sleep", "300"], what="sleep") as proc:
            raise RuntimeError("the step failed")
    assert proc.returncode == -signal.SIGTERM


SEAL = process.Seal(memory_bytes=2**30, input_name="hf-repo")


def test_failed_tool_reports_its_code_and_last_output(tmp_path):
    with pytest.raises(ToolFailed) as error:
        process.run_sealed(["/bin/sh", "-c", "echo converting; echo out of cheese; exit 3"], what="the converter",
                           writes_to=tmp_path, seal=SEAL)
    assert "the converter exited with code 3 (it may use 1.0 GiB of memory)" in error.value.message
    assert error.value.message.endswith("converting\nout of cheese")
    assert (error.value.tool, error.value.exit_code, error.value.retriable) == ("the converter", 3, False)


def test_missing_tool_is_a_tool_failure(tmp_path):
    with pytest.raises(ToolFailed, match="the converter exited with code 1"):  # the launcher's exec failed
        process.run_sealed(["/nonexistent/convert"], what="the converter", writes_to=tmp_path, seal=SEAL)


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MB tmpfs."""
    with servers.tmpfs(tmp_path / "tiny", 1) as mount:
        yield mount


@pytest.mark.tools  # root, to mount a tmpfs
def test_a_tool_that_fills_the_disk_fails_as_disk_full(tiny_filesystem):
    with pytest.raises(DiskFull) as error:
        process.run_sealed(["/bin/sh", "-c", f"head -c 4M /dev/zero > {tiny_filesystem}/out"], what="the writer",
                           writes_to=tiny_filesystem, seal=SEAL)
    assert error.value.path == tiny_filesystem and error.value.free < 64 * 1024 * 1024 and not error.value.retriable
    assert "The disk is full: the writer" in error.value.message and "GB free" in error.value.message
