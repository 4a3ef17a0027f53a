"""Unit tests: rendering checkpoint templates and deriving Ollama templates from them (pure)."""

from __future__ import annotations

import jinja2.exceptions
import pytest

from entrypoint import chat_jinja
from entrypoint.errors import RepoRefused

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
    with pytest.raises(jinja2.exceptions.SecurityError):
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


def test_a_template_that_loops_is_refused_within_its_budget(monkeypatch):
    monkeypatch.setattr(chat_jinja, "RENDER_BUDGET_S", 0.5)
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(RepoRefused, match=r"did not render .* within 0 s") as refused:
        chat_jinja.render(endless, [{"role": "user", "content": "x"}], bos_token="", eos_token="")
    assert refused.value.input_name == "template"


def test_a_template_that_writes_without_end_is_refused():
    flood = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
    with pytest.raises(RepoRefused, match="writes more than 1,000,000 characters"):
        chat_jinja.render(flood, [{"role": "user", "content": "x"}], bos_token="", eos_token="")
