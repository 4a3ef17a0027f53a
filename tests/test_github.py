"""Unit tests: workflow commands, outputs and secret scrubbing."""

from __future__ import annotations

from entrypoint import github
from tests import runner_commands
from tests.conftest import parse_outputs


def test_outputs_file_round_trips_multiline_values(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    github.set_outputs({"single": "v", "multi": "a.gguf\nb.gguf"})
    assert parse_outputs(out.read_text()) == {"single": "v", "multi": "a.gguf\nb.gguf"}
    assert "multi<<ghadelimiter_" in out.read_text()


def test_secrets_are_masked_and_scrubbed(capsys, monkeypatch):
    monkeypatch.setattr(github, "_secrets", [])
    github.register_secret("line-one-secret\nline-two-secret\n")
    github.log("token line-two-secret in a message")
    github.error("bad line-one-secret\nsecond line", title="T")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["::add-mask::line-one-secret", "::add-mask::line-two-secret"]
    assert lines[2] == "token *** in a message"
    assert lines[3] == "::error title=T::bad ***%0Asecond line"


HOSTILE = ["::add-mask::Paris", "  ::error file=x.py::pwned", "\t::stop-commands::abc", "a ##[set-output name=x;]y",
           "##[group]z", "::warning::w"]


def test_plain_text_never_becomes_a_workflow_command(capsys):
    for text in HOSTILE:
        github.log(text)
    github.log("\n".join(HOSTILE))  # also inside one multi-line message
    out = capsys.readouterr().out
    assert runner_commands.obeyed(out) == []
    # What is shown reads the same, but for an invisible character.
    assert out.replace("\u200b", "").splitlines() == HOSTILE * 2


def test_a_carriage_return_does_not_start_a_command(capsys):
    github.log("downloading 50%\r::add-mask::x\r\n::error::y")  # tools redraw progress lines with \r
    out = capsys.readouterr().out
    assert runner_commands.obeyed(out) == []
    assert out.replace("\u200b", "").splitlines() == ["downloading 50%", "::add-mask::x", "::error::y"]


def test_the_actions_own_commands_still_work(capsys):
    github.warning("::add-mask::not a mask")  # data after the command: never a second command
    with github.group("::stage::"):
        github.log("::endgroup::")
    github.error("##[add-mask]x", title="T")
    names = [c.name for c in runner_commands.obeyed(capsys.readouterr().out)]
    assert names == ["warning", "group", "endgroup", "error"]


def test_the_runners_rules_as_read_here():
    commands = runner_commands.obeyed("x\n  ::add-mask::a\n::stop-commands::T\n::error::hidden\n::T::\nb ##[group]c\n")
    assert [(c.name, c.data) for c in commands] == [("add-mask", "a"), ("stop-commands", "T"), ("group", "c")]


def test_progress_logs_every_30_seconds_with_rate_and_time_left_and_once_at_the_end(capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(github.time, "monotonic", lambda: clock[0])
    progress = github.Progress("pushing abc", 5 * 10**9)
    for second in range(1, 101):  # 50 MB/s for 100 s: a line at 30, 60 and 90 s, and none in between
        clock[0] += 1
        progress.update(second * 50 * 10**6)
    progress.update(5 * 10**9)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["pushing abc: 1.50 GB of 5.00 GB, 50 MB/s, about 70 s left",
                     "pushing abc: 3.00 GB of 5.00 GB, 50 MB/s, about 40 s left",
                     "pushing abc: 4.50 GB of 5.00 GB, 50 MB/s, about 10 s left",
                     "pushing abc: 5.00 GB done, 50 MB/s"], lines


def test_progress_of_a_small_blob_is_one_line_in_bytes(capsys):
    github.Progress("pushing f6f0c6f73b46", 1_192).update(1_192)
    assert capsys.readouterr().out == "pushing f6f0c6f73b46: 1,192 bytes done\n"
