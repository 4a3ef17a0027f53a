"""The error types' links to the README, and the failure as the log and summary show it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from entrypoint import __main__ as main
from entrypoint import errors, github

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _readme_anchors() -> set[str]:
    """The README's targets: <a id> anchors, and headings as GitHub slugs them."""
    ids = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', README))
    headings = re.findall(r"^#+ (.+)$", README, re.MULTILINE)
    slugs = {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}
    return ids | slugs


def _every_error_class(base=errors.PublishError) -> list[type]:
    return [base] + [c for sub in base.__subclasses__() for c in _every_error_class(sub)]


def _instances() -> list[errors.PublishError]:
    """One error of each type, and of each kind a type's data chooses an anchor by."""
    made = []
    for cls in _every_error_class():
        if issubclass(cls, errors.ServiceError):
            made += [cls("x", status=status, retriable=retriable) for status, retriable in
                     ((503, True), (None, True), (401, False), (403, False), (404, False))]
        elif cls is errors.InputError:
            made.append(cls("x", input_name="hf-repo"))
        elif cls is errors.RemoteCodeRefused:
            made.append(cls("x", attempt="code"))
        elif cls is errors.LimitExceeded:
            made.append(cls("x", resource="memory", limit=1))
        elif cls is errors.OllamaRefused:
            made.append(cls("x", status=500, title="t"))
        elif cls is errors.ToolMissing:
            made.append(cls("x", tool="llama-quantize"))
        elif cls is errors.NotEnoughResources:
            made.append(cls("x", resource="disk", needed=2, available=1))
        elif cls is errors.LocalWriteFailed:
            made.append(cls("x", path=Path("/"), title="t"))
        elif cls is errors.ToolFailed:
            made.append(cls("x", tool="t", exit_code=1))
        elif cls is errors.ToolRaised:
            made.append(cls("x", tool="t", exception="E"))
        elif cls is errors.DiskFull:
            made.append(cls(Path("/"), free=0))
        else:
            made.append(cls("x"))
    return made


def test_every_error_type_is_made_here():
    assert {type(e) for e in _instances()} == set(_every_error_class())


@pytest.mark.parametrize("error", _instances(), ids=lambda e: f"{type(e).__name__}-{e.anchor}")
def test_every_error_links_to_a_section_of_the_readme(error):
    assert error.anchor in _readme_anchors()


def test_the_anchor_follows_the_errors_data():
    assert errors.RegistryError("x", status=401, retriable=False).anchor == "push-refused"
    assert errors.RegistryError("x", status=None, retriable=False).anchor == "registry-unreachable"
    assert errors.RegistryError("x", status=503, retriable=True).anchor == "network-drop"
    assert errors.HubError("x", status=404, retriable=False).anchor == "hub-access"
    assert errors.ParityFailed("x").input_name == "template" and errors.ParityFailed("x").title == (
        "Prompt parity failed")


def test_a_failure_is_one_error_with_the_fix_and_the_link(monkeypatch, tmp_path, capsys):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("OLLAMA_PUBLISH_README", "https://github.com/owner/ollama-publish/blob/v1/README.md")
    error = errors.AlreadyPublished("ns/m:1.0.0 is already published with different content. Release a new "
                                    "version, or set overwrite: true.")
    assert main._fail(error.title, error.shown, more=github.readme_link(error.anchor)) == 1
    link = "https://github.com/owner/ollama-publish/blob/v1/README.md#already-published"
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"::error title=Version already published::{error.message}%0AMore: {link}"]  # names overwrite
    assert f"More: [already-published]({link})" in summary.read_text()


def test_without_the_address_the_link_names_the_readme(monkeypatch):
    monkeypatch.delenv("OLLAMA_PUBLISH_README", raising=False)
    assert github.readme_link("disk-full") == "README.md#disk-full"
