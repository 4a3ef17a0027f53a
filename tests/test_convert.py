"""Unit tests: the architecture check that refuses unconvertible checkpoints before any download."""

from __future__ import annotations

import json

import pytest

from entrypoint import convert, hub
from entrypoint.errors import PublishError, RemoteCodeRefused, RepoRefused

INIT = '''
from .base import ModelBase
TEXT_MODEL_MAP: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen",
}
MMPROJ_MODEL_MAP: dict[str, str] = {"LlavaForConditionalGeneration": "llava"}
'''


def test_text_architectures_are_read_from_the_converter_source():
    assert convert.text_architectures(INIT) == {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen"}


@pytest.mark.tools  # the converter tree (LLAMA_CPP_DIR)
def test_the_installed_converter_knows_common_architectures():
    supported = convert.supported_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM", "MistralForCausalLM"} <= set(supported)
    assert len(supported) > 100 and supported["BertModel"] == "bert"


def test_architecture_prefers_the_text_config():
    assert convert.architecture({"architectures": ["LlamaForCausalLM"]}) == "LlamaForCausalLM"
    assert convert.architecture({"architectures": ["X"], "text_config": {"architectures": ["Y"]}}) == "Y"
    assert convert.architecture({}) == ""


@pytest.mark.parametrize("config, phrase", [
    ({"architectures": ["FrobnicatorForCausalLM"]}, "architecture 'FrobnicatorForCausalLM'"),
    ({"model_type": "llama"}, "no architecture"),
])
def test_unsupported_architecture_is_refused_with_the_supported_list(config, phrase):
    supported = convert.text_architectures(INIT)
    with pytest.raises(PublishError) as caught:
        convert.check_architecture(config, supported, input_name="hf-repo")
    assert caught.value.input_name == "hf-repo"
    assert phrase in caught.value.message and "LlamaForCausalLM, Qwen2ForCausalLM" in caught.value.message
    convert.check_architecture({"architectures": ["LlamaForCausalLM"]}, supported, input_name="hf-repo")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.json"])
def test_repository_file_names_may_not_leave_the_download_folder(name):
    with pytest.raises(PublishError) as caught:
        hub.plan(["model.safetensors", "config.json", "tokenizer.json", name], "auto", ("Q4_K_M",), "a/b@main")
    assert "leave the repository folder" in caught.value.message


@pytest.mark.tools  # the converter tree (LLAMA_CPP_DIR)
def test_an_encoder_needs_sentence_transformers_pooling():
    supported = convert.supported_architectures()
    bert = {"architectures": ["BertModel"]}
    with pytest.raises(PublishError) as caught:
        convert.check_encoder_has_pooling(bert, supported, has_pooling=False, input_name="hf-repo")
    assert caught.value.input_name == "hf-repo" and "modules.json" in caught.value.message
    convert.check_encoder_has_pooling(bert, supported, has_pooling=True, input_name="hf-repo")
    convert.check_encoder_has_pooling({"architectures": ["LlamaForCausalLM"]}, supported, has_pooling=False,
                                      input_name="hf-repo")


@pytest.mark.parametrize("metadata, phrase", [
    ({"general.architecture": "bert", "bert.embedding_length": 64}, "has no pooling"),
    ({"general.architecture": "bert", "bert.pooling_type": 0, "bert.embedding_length": 64}, "pooling type is 0"),
    ({"general.architecture": "bert", "bert.pooling_type": 4, "bert.embedding_length": 64}, "pooling type is 4"),
])
def test_embedding_models_without_sentence_pooling_are_refused(metadata, phrase):
    with pytest.raises(PublishError, match=phrase):
        convert.check_embedding_model(metadata, input_name="hf-repo")


def test_any_architecture_with_sentence_pooling_is_an_embedding_model():
    for arch in ("bert", "modern-bert", "jina-bert-v3"):
        assert convert.check_embedding_model({"general.architecture": arch, f"{arch}.pooling_type": 1,
                                              f"{arch}.embedding_length": 64}, input_name="hf-repo") == 64


@pytest.mark.tools  # the converter tree (LLAMA_CPP_DIR)
def test_vision_checkpoints_are_recognised():
    assert convert.is_vision_model({"architectures": ["Idefics3ForConditionalGeneration"], "vision_config": {"a": 1}})
    assert not convert.is_vision_model({"architectures": ["LlamaForCausalLM"]})
    assert not convert.is_vision_model({"architectures": ["FrobnicatorForConditionalGeneration"],
                                        "vision_config": {"a": 1}})


LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_dora": False,
        "use_rslora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


@pytest.mark.parametrize("change, phrase", [
    ({"peft_type": "IA3"}, "a peft IA3 adapter"),
    ({"use_dora": True}, "DoRA (use_dora)"),
    ({"use_rslora": True}, "rsLoRA (use_rslora)"),
    ({"modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 16}}, "per-module ranks or alphas"),
    ({"target_modules": ["q_proj", "lm_head"]}, "a LoRA on lm_head"),
])
def test_adapters_the_merge_cannot_apply_exactly_are_refused(change, phrase):
    with pytest.raises(PublishError) as caught:
        convert.check_adapter({**LORA, **change}, input_name="hf-repo")
    assert caught.value.input_name == "hf-repo" and phrase in caught.value.message
    convert.check_adapter(LORA, input_name="hf-repo")
    convert.check_adapter({**LORA, "target_modules": "all-linear"}, input_name="hf-repo")


SHAPES = {"model.position_embeddings.weight": [512, 576],  # as BERT's: not the token embedding
          "model.embed_tokens.weight": [49152, 576],
          **{f"model.layers.{i}.mlp.up_proj.weight": [1536, 576] for i in range(30)}}
CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30}


@pytest.mark.parametrize("change, phrase", [
    ({"vocab_size": 10**9}, "vocab_size 1,000,000,000, but its token embedding has 49,152 rows"),
    ({"hidden_size": 100_000}, "hidden_size 100,000"),
    ({"num_hidden_layers": 300}, "num_hidden_layers 300, but its weights have 30 layers"),
    ({"text_config": {**CONFIG, "vocab_size": 10**9}}, "vocab_size 1,000,000,000"),
])
def test_a_config_that_claims_more_than_the_weights_hold_is_refused(change, phrase):
    with pytest.raises(RepoRefused, match=phrase):
        convert.check_config_matches_weights({**CONFIG, **change}, SHAPES, input_name="hf-repo")
    convert.check_config_matches_weights(CONFIG, SHAPES, input_name="hf-repo")


def test_safetensors_shapes_come_from_the_header_and_a_bad_header_is_refused(tmp_path):
    header = json.dumps({"a.weight": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    assert convert.safetensors_shapes(tmp_path) == {"a.weight": [2, 3]}
    (tmp_path / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(RepoRefused, match="not a safetensors file"):
        convert.safetensors_shapes(tmp_path)


RENAMED = {name.replace("embed_tokens", "wordpiece_table").replace("layers", "stack"): shape
           for name, shape in SHAPES.items()}


@pytest.mark.parametrize("change, phrase", [
    ({"vocab_size": 4 * 10**9}, "vocab_size 4,000,000,000, but no tensor of its weights has a dimension over 49,152"),
    ({"intermediate_size": 10**8}, "intermediate_size 100,000,000, but no tensor"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers 1,000,000, but its weights are 32 tensors in all"),
])
def test_a_config_is_bounded_by_the_weights_whatever_the_tensors_are_called(change, phrase):
    with pytest.raises(RepoRefused, match=phrase):
        convert.check_config_matches_weights({**CONFIG, **change}, RENAMED, input_name="hf-repo")
    convert.check_config_matches_weights(CONFIG, RENAMED, input_name="hf-repo")


def test_a_tensor_without_a_valid_shape_is_refused(tmp_path):
    header = json.dumps({"a.weight": {"dtype": "F16", "shape": "huge", "data_offsets": [0, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(RepoRefused, match=r"model\.safetensors: the tensor a\.weight has no valid shape"):
        convert.safetensors_shapes(tmp_path)


def test_only_the_files_the_converter_reads_are_measured(tmp_path):
    header = json.dumps({"a.weight": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "consolidated.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    assert convert.safetensors_shapes(tmp_path) == {}
    assert convert.largest_tensor({"a": [2, 3], "b": [7]}) == 7


@pytest.mark.parametrize("file, content, phrase", [
    ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer",
                               "auto_map": {"AutoTokenizer": ["other/repo--tok.Tok", None]}},
     'tokenizer_config.json: auto_map {"AutoTokenizer": ["other/repo--tok.Tok", null]}'),
    ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}, "config.json: auto_map"),
    ("config.json", {"text_config": {"auto_map": {"AutoConfig": "c.C"}}}, "config.json: text_config.auto_map"),
    ("tokenizer_config.json", {"tokenizer_class": "HybridDNATokenizer"},
     "tokenizer_class HybridDNATokenizer (only a repository's code provides it)"),
    ("adapter_config.json", {"auto_map": {"base_model_class": "x.Y"}}, "adapter_config.json: auto_map"),
])
def test_code_a_repository_declares_is_refused_by_name(tmp_path, file, content, phrase):
    (tmp_path / file).write_text(json.dumps(content))
    with pytest.raises(RemoteCodeRefused) as refused:
        convert.check_no_custom_code([tmp_path], input_name="hf-repo")
    assert phrase in refused.value.message and refused.value.input_name == "hf-repo"
    assert refused.value.attempt == "declared"


def test_a_checkpoint_with_only_shipped_classes_passes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    convert.check_no_custom_code([tmp_path], input_name="hf-repo")
