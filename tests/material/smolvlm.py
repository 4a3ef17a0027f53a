"""A small vision-language checkpoint: SmolVLM's architecture (Idefics3: a SigLIP image encoder and a
pixel-shuffle projector in front of a Llama text model) whose text model is the real SmolLM2-135M-Instruct
(weights, tokenizer and chat template from $SMOLLM2_CHECKPOINT) and whose image encoder is tiny and
seeded-random: the model answers text like SmolLM2 and sees images as noise, enough to prove that an
image reaches it. Its vocabulary is SmolLM2's plus SmolVLM's image tokens (<image>, and the
<fake_token_around_image>, <global-img> and <row_i_col_j> that llama.cpp's projector writes around an
image), with zero embeddings: text never uses them.

    python -m tests.material.smolvlm OUT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

IMAGE_SIZE = 64
COPIED = ("chat_template.jinja", "generation_config.json", "LICENSE")
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))]


def build(out_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration

    text = Path(os.environ["SMOLLM2_CHECKPOINT"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(text)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.save_pretrained(out_dir)
    for name in COPIED:  # after the tokenizer, so the checkpoint's own chat template file stays as it is
        if (text / name).is_file():
            shutil.copy(text / name, out_dir / name)
    text_config = {k: v for k, v in json.loads((text / "config.json").read_text()).items()
                   if k not in ("architectures", "_model_name_or_path", "transformers_version", "dtype")}
    text_config["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIZE, "patch_size": 16, "num_channels": 3},
        text_config=text_config, scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True)
    model = Idefics3ForConditionalGeneration(config).eval()
    text_weights = load_file(text / "model.safetensors")
    weights = {f"model.text_model.{k.removeprefix('model.')}": v for k, v in text_weights.items()
               if k.startswith("model.")}
    embeddings = weights["model.text_model.embed_tokens.weight"]
    extra = torch.zeros(len(tokenizer) - embeddings.shape[0], embeddings.shape[1], dtype=embeddings.dtype)
    weights["model.text_model.embed_tokens.weight"] = torch.cat([embeddings, extra])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(not k.startswith("model.text_model.") for k in missing), (missing, unexpected)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    config_json = json.loads((out_dir / "config.json").read_text())
    # The converter takes the text model's class from text_config (SmolVLM's own configs name it there too).
    config_json["text_config"]["architectures"] = ["LlamaForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=1))
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
        "size": {"longest_edge": IMAGE_SIZE}, "max_image_size": {"longest_edge": IMAGE_SIZE},
        "do_image_splitting": False}))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
