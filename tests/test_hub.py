"""How a repo is published, decided from its file names (hub.plan): pure, no server."""

from __future__ import annotations

import re

import pytest

from entrypoint import hub
from entrypoint.errors import PublishError, RepoRefused

CHECKPOINT = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
              ".gitattributes"]
GGUF_REPO = ["README.md", "LICENSE", "model-Q4_K_M.gguf", "model-q8_0.gguf", "model-Q4_K_S.gguf",
             "mmproj-model-f16.gguf", "model-F16.gguf", "model-BF16.gguf"]


def test_a_checkpoint_is_converted():
    plan = hub.plan(CHECKPOINT, "auto", ("Q4_K_M",), "a/b@main")
    assert plan.kind == "transformers" and "has *.safetensors weights" in plan.why
    assert ".gitattributes" not in plan.files and "model.safetensors" in plan.files and plan.ggufs == {}


def test_a_gguf_repo_is_published_as_it_is():
    plan = hub.plan(GGUF_REPO, "auto", ("Q4_K_M", "Q8_0", "F16"), "a/b@main")
    assert plan.kind == "gguf" and "without conversion" in plan.why and "no *.safetensors" in plan.why
    # Case does not matter; Q4_K_S is not Q4_K_M; BF16 is not F16; the projector is not a model.
    assert plan.ggufs == {"Q4_K_M": ("model-Q4_K_M.gguf",), "Q8_0": ("model-q8_0.gguf",), "F16": ("model-F16.gguf",)}
    assert set(plan.files) == {"model-Q4_K_M.gguf", "model-q8_0.gguf", "model-F16.gguf", "README.md", "LICENSE"}


def test_both_kinds_auto_converts_unless_forced():
    assert hub.plan(CHECKPOINT + GGUF_REPO, "auto", ("Q8_0",), "a/b@main").kind == "transformers"
    forced = hub.plan(CHECKPOINT + GGUF_REPO, "gguf", ("Q8_0",), "a/b@main")
    assert forced.kind == "gguf" and "forced by repo-kind: gguf" in forced.why


def test_missing_quantization_lists_what_the_repo_offers():
    with pytest.raises(PublishError) as caught:
        hub.plan(GGUF_REPO, "auto", ("Q4_K_M", "Q5_K_M"), "a/b@main")
    assert caught.value.input_name == "quantizations"
    assert "no GGUF file for Q5_K_M" in caught.value.message
    assert "It offers: BF16 (model-BF16.gguf), F16 (model-F16.gguf), Q4_K_M (model-Q4_K_M.gguf), " \
           "Q4_K_S (model-Q4_K_S.gguf), Q8_0 (model-q8_0.gguf)" in caught.value.message


def test_split_files_are_taken_whole_and_ambiguous_or_incomplete_ones_refused():
    split = ["a-Q4_K_M-00002-of-00003.gguf", "a-Q4_K_M-00001-of-00003.gguf", "a-Q4_K_M-00003-of-00003.gguf"]
    plan = hub.plan(split + ["a-Q8_0.gguf"], "auto", ("Q4_K_M", "Q8_0"), "a/b@main")
    assert plan.ggufs == {"Q4_K_M": tuple(sorted(split)), "Q8_0": ("a-Q8_0.gguf",)}
    assert set(plan.files) == set(split) | {"a-Q8_0.gguf"}
    with pytest.raises(PublishError, match=r"has only 2 of the 3 parts of a-Q4_K_M-\*-of-00003\.gguf"):
        hub.plan(split[:2], "auto", ("Q4_K_M",), "a/b@main")
    several = "several GGUF files for Q4_K_M: a.Q4_K_M.gguf, sub/b-Q4_K_M.gguf"
    with pytest.raises(PublishError, match=re.escape(several)):
        hub.plan(["a.Q4_K_M.gguf", "sub/b-Q4_K_M.gguf"], "auto", ("Q4_K_M",), "a/b@main")


def test_forced_kind_the_repo_does_not_have():
    with pytest.raises(PublishError) as caught:
        hub.plan(CHECKPOINT, "gguf", ("Q4_K_M",), "a/b@main")
    assert caught.value.input_name == "repo-kind"
    with pytest.raises(PublishError, match=re.escape("has no model*.safetensors weights")):
        hub.plan(GGUF_REPO, "transformers", ("Q4_K_M",), "a/b@main")


def test_pickle_only_repo_is_refused_unless_allowed():
    files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "training_args.bin", "optimizer.pt", "tokenizer.json"]
    with pytest.raises(PublishError) as caught:
        hub.plan(files, "auto", ("Q4_K_M",), "a/b@main")
    assert caught.value.input_name == "hf-repo" and "allow-pickle: true" in caught.value.message
    pickles = "pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin"
    assert f"only pickle weights ({pickles}" in caught.value.message
    allowed = hub.plan(files, "auto", ("Q4_K_M",), "a/b@main", allow_pickle=True)
    assert allowed.kind == "transformers" and "allow-pickle: true" in allowed.why
    # Only the weights the converter reads: other pickles in the repo are never downloaded.
    assert set(allowed.files) == {"config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                  "pytorch_model.bin.index.json", "tokenizer.json"}
    # With safetensors present, pickles are not downloaded even when allowed.
    both = hub.plan(files + ["model.safetensors"], "auto", ("Q4_K_M",), "a/b@main", allow_pickle=True)
    assert not any(f.endswith(".bin") for f in both.files)


def test_a_repo_without_any_weights():
    with pytest.raises(RepoRefused, match=re.escape("has no model*.safetensors weights at its top level")):
        hub.plan(["config.json", "tokenizer.json", "training_args.bin"], "auto", ("Q4_K_M",), "a/b@main",
                 allow_pickle=True)


def test_a_lora_adapter_is_merged_into_its_base():
    files = ["adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
             "training_args.bin", "checkpoint-10/adapter_model.safetensors", "checkpoint-10/optimizer.pt"]
    plan = hub.plan(files, "auto", ("Q4_K_M",), "a/b@main")
    assert plan.kind == "lora" and "merge the LoRA adapter into its base model" in plan.why
    # The adapter and tokenizer at the top level only: not training checkpoints, pickles or the model card.
    assert set(plan.files) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                               "tokenizer_config.json"}
    with pytest.raises(PublishError, match="has no LoRA adapter") as caught:
        hub.plan(["adapter_config.json", "adapter_model.bin"], "auto", ("Q4_K_M",), "a/b@main")
    assert caught.value.input_name == "hf-repo"
    with pytest.raises(PublishError, match="has no LoRA adapter"):
        hub.plan(CHECKPOINT, "lora", ("Q4_K_M",), "a/b@main")


def test_only_what_the_converter_reads_is_downloaded():
    """Top-level model*.safetensors and their index, not a consolidated copy or a training checkpoint's."""
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "consolidated.safetensors", "checkpoint-500/model.safetensors", "checkpoint-500/config.json",
             "config.json", "tokenizer.json", "1_Pooling/config.json", "modules.json", "sentence_bert_config.json",
             "onnx/model.onnx"]
    assert set(hub.plan(files, "auto", ("Q4_K_M",), "a/b@main").files) == {
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "config.json", "tokenizer.json", "1_Pooling/config.json", "modules.json", "sentence_bert_config.json"}


def test_weights_only_in_a_subfolder_are_not_weights():
    with pytest.raises(RepoRefused, match="at its top level"):
        hub.plan(["config.json", "tokenizer.json", "checkpoint-500/model.safetensors"], "auto", ("Q4_K_M",),
                 "a/b@main")
