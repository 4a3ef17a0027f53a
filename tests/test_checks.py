"""Unit tests of the parity check's pure parts: what is compared, when the TEMPLATE is pinned, and how
failures are explained."""

from __future__ import annotations

from entrypoint import chat_jinja, checks, modelfile

ALL = chat_jinja.Capabilities(tools=True, tool_round_trip=True, thinking=True, thinking_switch=True)


def test_a_rendering_is_compared_on_what_it_offers():
    assert set(checks.conversations(checks.compared_capabilities(ALL, {"tools"}))) == {
        *checks.CONVERSATIONS, "two tools", "two tools + system", "tool call + result"}
    assert set(checks.conversations(checks.compared_capabilities(ALL, set()))) == set(checks.CONVERSATIONS)


def test_the_template_is_pinned_only_when_nothing_but_the_jinja_failed():
    jinja = checks.ParityFailure("user", checks.CHAT_TEMPLATE, "a", "b")
    go = checks.ParityFailure("user", checks.GO_TEMPLATE, "a", "b")
    both = [checks.CHAT_TEMPLATE, checks.GO_TEMPLATE]
    assert checks.pins_template([jinja], both)
    assert not checks.pins_template([jinja, go], both)
    assert not checks.pins_template([jinja], [checks.CHAT_TEMPLATE])
    assert not checks.pins_template([], both)


def test_a_jinja_rendering_without_the_reasoning_is_explained():
    expected = f"<think>{checks.REASONING}</think><tool_call>"
    dropped = checks.ParityFailure("thinking + tool call + result", checks.CHAT_TEMPLATE, expected, "<tool_call>",
                                   reasoning_dropped=True)
    assert "passes no assistant turn's thinking to llama-server" in checks.explain([dropped])
    other = checks.ParityFailure("user", checks.CHAT_TEMPLATE, "a", "b")
    assert "llama-server" not in checks.explain([other])


def test_the_reasoning_ollama_drops_neither_pins_the_template_nor_hides_other_failures():
    dropped = checks.ParityFailure("thinking + tool call + result", checks.CHAT_TEMPLATE, "a", "b",
                                   reasoning_dropped=True)
    jinja = checks.ParityFailure("user", checks.CHAT_TEMPLATE, "a", "b")
    both = [checks.CHAT_TEMPLATE, checks.GO_TEMPLATE]
    assert checks.only_reasoning_dropped([dropped])
    assert not checks.only_reasoning_dropped([dropped, jinja]) and not checks.only_reasoning_dropped([])
    assert not checks.pins_template([dropped], both)  # pinning would give up the Jinja's tools for it
    assert checks.pins_template([dropped, jinja], both)


def test_the_reasoning_is_left_out_only_of_what_the_conversation_sends():
    template = ("{% for m in messages %}<{{ m.role }}>{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
                "</think>{% endif %}{{ m.content }}{% endfor %}")
    info = modelfile.TokenizerInfo(chat_template=template, eos_tokens=("</s>",), bos_token="<s>")
    case = checks.conversations(ALL)["thinking + tool call + result"]
    full = checks._reference(info, case, thinks=True, adds_bos=False)
    without = checks._without_reasoning(info, case, thinks=True, adds_bos=False)
    assert checks.REASONING in full and without == full.replace(f"<think>{checks.REASONING}</think>", "")
    assert checks._without_reasoning(info, checks.conversations(ALL)["tool call + result"], True, False) is None


def test_tool_calls_are_described_for_the_log():
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"function": {"name": "get_time", "arguments": {}}}]
    assert checks.describe_tool_calls(calls) == 'tool call get_weather({"city": "Paris"}); tool call get_time({})'
    assert checks.describe_tool_calls([]) == ""
