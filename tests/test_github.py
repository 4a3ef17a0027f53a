"""Unit tests: workflow commands, outputs and secret scrubbing."""

from __future__ import annotations

from entrypoint import github
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
