"""The template report as a test, over llama.cpp's real chat templates, each embedded in a GGUF as the
converter embeds a checkpoint's: every template is published only with all its comparisons passing
(plain, tools and thinking conversations; a thinking one may lack only the reasoning Ollama does not pass to
llama-server) and with the tools it supports, or caught before any push, or refused with a reason before any
work; at least 90% pass plain prompt parity, and 90% of those with tools pass tools parity; the families the
issues name are published, and each built-in renderer's verified templates with that renderer."""

from __future__ import annotations

import pytest

from entrypoint import modelfile
from tests.template_report import DROPPED, build_report, summary, to_markdown

pytestmark = pytest.mark.servers


def test_real_templates_are_published_only_when_proven():
    rows = build_report()
    print(to_markdown(rows))
    assert len(rows) >= 69  # llama.cpp 10970's models/templates
    for row in rows:
        if row.published:
            assert row.parity["plain"] == "pass" and row.parity["tools"] in ("pass", ""), row
            assert row.parity["thinking"] in ("pass", "") or row.parity["thinking"].startswith(DROPPED), row
            if "tools" in row.supports:
                assert row.parity["tools"] == "pass", row  # published with its tools, proven
        else:
            assert row.handled.removeprefix("caught: ").removeprefix("refused: ").strip(), row
    plain = [row.name for row in rows if row.parity.get("plain") == "pass"]
    assert len(plain) >= 0.9 * len(rows), f"{len(plain)} of {len(rows)} pass plain prompt parity"
    tools, with_tools = summary(rows)["tools"]
    assert tools >= 0.9 * with_tools, f"{tools} of {with_tools} templates with tools pass tools parity"
    published = {row.name for row in rows if row.published}
    for family in ("meta-llama-Llama-3.1-8B-Instruct", "google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct",
                   "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
                   # its Jinja, after a renderer was tried (the model is unloaded between candidates)
                   "Qwen3-Coder",
                   # its Jinja, which writes its own default system prompt (no SYSTEM line) with tools
                   "ibm-granite-granite-4.0"):
        assert family in published, family
    by_name = {row.name: row for row in rows}
    for renderer in modelfile.RENDERERS.values():  # each built-in renderer publishes what it was verified with
        for name in renderer.verified_with:
            assert (by_name[name].handled, by_name[name].rendering) == (f"{renderer.name} (renderer)", "renderer"), \
                by_name[name]
    print(summary(rows))
