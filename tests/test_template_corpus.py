"""The template report as tests, over llama.cpp's real chat templates, each embedded in a GGUF as the
converter embeds a checkpoint's (tests/template_report.py), one test per template: it is published only
with all its comparisons passing (plain, tools and thinking conversations; a thinking one may lack only
the reasoning Ollama does not pass to llama-server) and with the tools it supports, or caught before any
push, or refused with a reason before any work; the families the issues name are published, and each
built-in renderer's verified templates with that renderer. Then the corpus as a whole: at least 90% pass
plain prompt parity, and 90% of those with tools pass tools parity."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from entrypoint import modelfile
from entrypoint.ollama import OllamaClient
from tests import servers
from tests.template_report import DROPPED, Row, check_template, summary, templates, to_markdown, tokenizer_gguf

pytestmark = pytest.mark.servers
# The corpus is llama.cpp 10970's models/templates; test ids are the templates' names.
CORPUS = templates() if os.environ.get("LLAMA_CPP_DIR") else []
MUST_PUBLISH = ("meta-llama-Llama-3.1-8B-Instruct", "google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct",
                "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
                # its Jinja, after a renderer was tried (the model is unloaded between candidates)
                "Qwen3-Coder",
                # its Jinja, which writes its own default system prompt (no SYSTEM line) with tools
                "ibm-granite-granite-4.0")
VERIFIED_RENDERER = {name: renderer.name for renderer in modelfile.RENDERERS.values()
                     for name in renderer.verified_with}
ROWS: dict[str, Row] = {}  # each template's row, for the corpus-wide test at the end of this module


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory) -> Iterator[tuple[OllamaClient, Path, Path]]:
    root = tmp_path_factory.mktemp("corpus")
    with servers.ollama(root / "home") as url:
        yield OllamaClient(url), tokenizer_gguf(root), root


@pytest.mark.parametrize("path", CORPUS, ids=[path.stem for path in CORPUS])
def test_a_template_is_published_only_when_proven(corpus_server, path):
    client, base, root = corpus_server
    row = check_template(client, CORPUS.index(path), path, base, root)
    ROWS[row.name] = row
    print(row)
    if row.published:
        assert row.parity["plain"] == "pass" and row.parity["tools"] in ("pass", ""), row
        assert row.parity["thinking"] in ("pass", "") or row.parity["thinking"].startswith(DROPPED), row
        if "tools" in row.supports:
            assert row.parity["tools"] == "pass", row  # published with its tools, proven
    else:
        assert row.handled.removeprefix("caught: ").removeprefix("refused: ").strip(), row
    if row.name in MUST_PUBLISH:
        assert row.published, row
    if row.name in VERIFIED_RENDERER:  # each built-in renderer publishes what it was verified with
        assert (row.handled, row.rendering) == (f"{VERIFIED_RENDERER[row.name]} (renderer)", "renderer"), row


def test_the_corpus_as_a_whole():
    """After every template's test (this module's tests run in order, on one worker): the whole corpus was
    checked, 90% pass plain prompt parity, 90% of those with tools pass tools parity."""
    assert len(CORPUS) >= 69 and sorted(ROWS) == sorted(path.stem for path in CORPUS), sorted(ROWS)
    rows = list(ROWS.values())
    print(to_markdown(rows))
    plain = [row.name for row in rows if row.parity.get("plain") == "pass"]
    assert len(plain) >= 0.9 * len(rows), f"{len(plain)} of {len(rows)} pass plain prompt parity"
    tools, with_tools = summary(rows)["tools"]
    assert tools >= 0.9 * with_tools, f"{tools} of {with_tools} templates with tools pass tools parity"
    assert set(MUST_PUBLISH) <= set(ROWS) and set(VERIFIED_RENDERER) <= set(ROWS)
