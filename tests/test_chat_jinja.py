"""Unit tests: rendering checkpoint templates and deriving Ollama templates from them (pure)."""

from __future__ import annotations

import jinja2.exceptions
import pytest

from entrypoint import chat_jinja, checks
from entrypoint.errors import LimitExceeded

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
         "{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + "
         "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}<|assistant|>")


def test_render_matches_transformers_conventions():
    text = chat_jinja.render("{% for m in messages %}\n  {{ m.content }}\n{% endfor %}",
                             [{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    assert text == "  hi\n"  # trim_blocks and lstrip_blocks, as transformers sets them


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(jinja2.TemplateError, match="access to attribute '__class__' of 'str' object is unsafe"):
        chat_jinja.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [], bos_token="", eos_token="")


def test_derives_llama3():
    derived = chat_jinja.derive(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                "<|eot_id|>"))
    assert derived.end_of_turn == ("<|eot_id|>",)
    assert "<|eot_id|>" not in derived.begin_of_turn and "<|start_header_id|>" in derived.begin_of_turn
    assert derived.default_system == ""
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n" in derived.go_template


def test_derives_gemma_with_system_folded_into_the_first_turn():
    derived = chat_jinja.derive(GEMMA, bos_token="<bos>", eos_token="<eos>",
                                special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"))
    assert derived.end_of_turn == ("<end_of_turn>",)
    # system -> user is the blank line inside the first user turn
    assert '{{ else if eq $prev "system" }}\n\n' in derived.go_template


def test_a_template_refusing_system_messages_skips_them():
    derived = chat_jinja.derive(NO_SYSTEM, bos_token="<s>", eos_token="</s>", special_tokens=("</s>",))
    assert derived.go_template.startswith('{{ $prev := "" }}{{ range $m := .Messages }}{{ if ne $m.Role "system" }}')
    assert derived.end_of_turn == ("</s>",)
    assert not derived.supports_system


# The same format, with system messages skipped instead of refused: they are rendered zero times.
DROPS_SYSTEM = ("{% for m in messages %}{% if m.role != 'system' %}<|{{ m.role }}|>{{ m.content }}</s>{% endif %}"
                "{% endfor %}<|assistant|>")


def test_a_template_dropping_system_messages_is_handled_as_one_refusing_them():
    dropped = chat_jinja.derive(DROPS_SYSTEM, bos_token="<s>", eos_token="</s>", special_tokens=("</s>",))
    refused = chat_jinja.derive(NO_SYSTEM, bos_token="<s>", eos_token="</s>", special_tokens=("</s>",))
    assert dropped == refused
    assert chat_jinja.derive(LLAMA3, bos_token="<s>", eos_token="</s>", special_tokens=()).supports_system


def test_delimiters_in_literal_text_are_quoted():
    derived = chat_jinja.derive("{% for m in messages %}{{ '{{' }}{{ m.role }}: {{ m.content }}\n{% endfor %}",
                                bos_token="", eos_token="", special_tokens=())
    assert '{{ "\\n{{assistant: " }}' in derived.go_template


def test_a_template_that_writes_the_date_cannot_be_derived():
    with pytest.raises(chat_jinja.CannotDerive, match="YYYY-MM-DD"):
        chat_jinja.derive("Today is {{ strftime_now('%d %B %Y') }}.{% for m in messages %}{{ m.content }}{% endfor %}",
                          bos_token="", eos_token="", special_tokens=())


def test_an_iso_date_becomes_ollamas_current_date():
    derived = chat_jinja.derive("{% if messages[0].role != 'system' %}Date: {{ strftime_now('%Y-%m-%d') }}\n"
                                "{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}",
                                bos_token="", eos_token="", special_tokens=())
    assert "Date: {{ currentDate }}\n<user>" in derived.go_template
    assert derived.default_system == ""


@pytest.mark.parametrize("template, bos", [(LLAMA3, "<|begin_of_text|>"), (GEMMA, "<bos>")])
def test_a_bos_the_tokenizer_adds_is_not_written_again(template, bos):
    kept = chat_jinja.derive(template, bos_token=bos, eos_token="", special_tokens=())
    left_out = chat_jinja.derive(template, bos_token=bos, eos_token="", special_tokens=(), bos_added=True)
    assert bos in kept.go_template
    assert bos not in left_out.go_template
    assert left_out.go_template == kept.go_template.replace(bos, "")


@pytest.mark.parametrize("template, resource", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "cpu"),  # a loop
    ("{{ 99 ** 99999999 }}", "cpu"),  # a constant Jinja folds while compiling, in C: no Python check runs
    ("{{ 'a' * 10**10 }}", "memory"),  # the kernel refuses the allocation
    ("{% set x = 'a' * 300000000 %}{{ x | length }}", "memory"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output"),
])
def test_a_template_past_a_limit_is_refused_and_the_next_one_renders(template, resource):
    with pytest.raises(LimitExceeded) as refused:
        chat_jinja.render(template, [{"role": "user", "content": "x"}], bos_token="", eos_token="")
    assert (refused.value.resource, refused.value.input_name) == (resource, "template")
    assert "Set the template input" in refused.value.message
    # The worker was stopped, or survived its refused allocation: the next template renders all the same.
    assert chat_jinja.render("{{ messages[0].content }}!", [{"role": "user", "content": "x"}], bos_token="",
                             eos_token="") == "x!"


def test_a_template_that_recurses_without_end_cannot_render():
    with pytest.raises(jinja2.TemplateError, match="RecursionError"):
        chat_jinja.render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", [], bos_token="", eos_token="")


# ------------------------------------------------------------------------------------------------
# Capabilities, read off renderings.

QWEN3_LIKE = """{%- if tools %}<|im_start|>system
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}
{%- for call in m.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"""
# Mentions tools and thinking in its text but writes neither: detection goes by what is rendered.
MENTIONS_ONLY = ("{# tools, tool_calls, <think></think> are not supported #}{% for m in messages %}"
                 "<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}<|assistant|>")
ALWAYS_THINKS = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}<|assistant|><think>\n")
TOOLS_WITHOUT_RESULTS = ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}"
                         "{% if m.role != 'tool' %}<|{{ m.role }}|>{{ m.content }}</s>{% endif %}{% endfor %}"
                         "<|assistant|>")


def _caps(template: str) -> chat_jinja.Capabilities:
    return chat_jinja.capabilities(template, bos_token="<s>", eos_token="</s>")


def test_capabilities_of_a_template_with_tools_and_thinking():
    caps = _caps(QWEN3_LIKE)
    assert caps == chat_jinja.Capabilities(tools=True, tool_round_trip=True, thinking=True, thinking_switch=True)
    assert caps.names() == ("tools", "thinking")


def test_capabilities_come_from_renderings_not_from_the_text():
    assert _caps(MENTIONS_ONLY) == chat_jinja.NO_CAPABILITIES
    assert _caps(MENTIONS_ONLY).names() == ()


def test_a_generation_prompt_that_opens_a_think_block_thinks_without_a_switch():
    assert _caps(ALWAYS_THINKS) == chat_jinja.Capabilities(tools=False, tool_round_trip=False, thinking=True,
                                                           thinking_switch=False)


def test_tools_without_tool_results_have_no_round_trip():
    caps = _caps(TOOLS_WITHOUT_RESULTS)
    assert caps.tools and not caps.tool_round_trip and caps.names() == ("tools",)


def test_a_python_error_inside_a_template_is_a_template_error():
    # tojson of a generator: transformers' templates raise TypeError there; it means "cannot render".
    with pytest.raises(jinja2.exceptions.TemplateError):
        chat_jinja.render("{{ (messages | map(attribute='role')) | tojson }}", [{"role": "user", "content": "x"}],
                          bos_token="", eos_token="")


def test_the_parity_conversations_follow_the_capabilities():
    plain = set(checks.conversations(chat_jinja.NO_CAPABILITIES))
    assert plain == set(checks.CONVERSATIONS)
    full = checks.conversations(_caps(QWEN3_LIKE))
    assert set(full) - plain == {"two tools", "two tools + system", "tool call + result", "thinking on",
                                 "thinking off", "thinking + tool call + result"}
    assert [c.tools for c in full.values() if c.kind == "tools"] == [checks.TOOLS] * 3
    assert {c.think for c in full.values() if c.kind == "thinking"} == {True, False}
    assert set(checks.conversations(_caps(TOOLS_WITHOUT_RESULTS))) - plain == {"two tools", "two tools + system"}


def test_a_model_must_offer_the_checkpoints_tools():
    caps = _caps(TOOLS_WITHOUT_RESULTS)
    assert checks.capability_failures(caps, {"capabilities": ["completion", "tools"]}) == []
    # More is compared by prompt parity like the rest (compared_capabilities), not refused here.
    assert checks.capability_failures(caps, {"capabilities": ["completion", "tools", "thinking"]}) == []
    fewer = checks.capability_failures(caps, {"capabilities": ["completion"]})
    assert [(f.expected, f.actual) for f in fewer] == [("the checkpoint's template supports: tools",
                                                       "the model offers: no tools, no thinking")]


def test_thinking_the_model_does_not_offer_is_told_apart():
    thinks = _caps(ALWAYS_THINKS)
    assert checks.capability_failures(thinks, {"capabilities": ["completion"]}) == []
    assert checks.missing_thinking(thinks, {"capabilities": ["completion"]})
    assert not checks.missing_thinking(thinks, {"capabilities": ["completion", "thinking"]})
    assert not checks.missing_thinking(_caps(TOOLS_WITHOUT_RESULTS), {"capabilities": ["completion", "tools"]})


def test_what_a_rendering_offers_beyond_the_checkpoint_is_compared_too():
    plain_caps = _caps(MENTIONS_ONLY)
    extra = checks.compared_capabilities(plain_caps, {"completion", "tools", "thinking"})
    assert set(checks.conversations(extra)) - set(checks.CONVERSATIONS) == {
        "two tools", "two tools + system", "tool call + result", "thinking on", "thinking off",
        "thinking + tool call + result"}
    # What a rendering lacks is not compared (capability_failures reports it); the rest as detailed as the
    # checkpoint's template allows: no round trip where it writes no results.
    lacking = checks.compared_capabilities(_caps(QWEN3_LIKE), {"completion", "tools"})
    assert lacking == chat_jinja.Capabilities(tools=True, tool_round_trip=True, thinking=False, thinking_switch=False)
    assert not checks.compared_capabilities(_caps(TOOLS_WITHOUT_RESULTS), {"tools"}).tool_round_trip
