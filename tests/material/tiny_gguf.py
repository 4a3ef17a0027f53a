"""A tiny GGUF that carries a real model's tokenizer: every metadata key of the source GGUF (vocabulary,
merges, special tokens, chat template, BOS/EOS flags) kept as it is, and the weights replaced by one
llama layer of width 32, all zeros. For tests about prompts, which depend on the tokenizer and the
template and never on the weights (the template corpus): Ollama and llama-server load it in
milliseconds, and it is a few megabytes where SmolLM2-135M-Instruct's Q4_1 GGUF is 98 MB.

    python -m tests.material.tiny_gguf SOURCE.gguf TARGET.gguf

write() makes one per chat template from the source's metadata read once (metadata()): the corpus report
writes 70 of them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

WIDTH, FEED_FORWARD = 32, 64
# (key, value, type, array item type): every key of a GGUF but its architecture's own.
Metadata = tuple[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]


@functools.lru_cache(maxsize=4)
def metadata(source: Path) -> Metadata:
    reader = gguf.GGUFReader(source)
    architecture = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    return tuple((field.name, field.contents(), field.types[0],
                  field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
                 for field in reader.fields.values()
                 if not field.name.startswith(("GGUF.", f"{architecture}."))
                 and field.name != gguf.Keys.General.ARCHITECTURE)


def build(source: Path, target: Path) -> None:
    write(metadata(source), target)


def write(keys: Metadata, target: Path, overrides: dict[str, Any] | None = None) -> None:
    """The tiny model with `keys`, each of `overrides` (a string or a bool) replacing or adding its key."""
    overrides = dict(overrides or {})
    vocabulary = len(next(value for key, value, *_ in keys if key == gguf.Keys.Tokenizer.LIST))
    writer = gguf.GGUFWriter(str(target), "llama")
    for key, value, kind, item_kind in keys:
        if key not in overrides:
            writer.add_key_value(key, value, kind, sub_type=item_kind)
    for key, value in overrides.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.BOOL if isinstance(value, bool)
                             else gguf.GGUFValueType.STRING)
    writer.add_context_length(2048)
    writer.add_embedding_length(WIDTH)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_block_count(1)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(WIDTH)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocabulary)
    shapes = {"token_embd.weight": (vocabulary, WIDTH), "output_norm.weight": (WIDTH,),
              "blk.0.attn_norm.weight": (WIDTH,), "blk.0.ffn_norm.weight": (WIDTH,),
              **{f"blk.0.attn_{p}.weight": (WIDTH, WIDTH) for p in ("q", "k", "v", "output")},
              "blk.0.ffn_gate.weight": (FEED_FORWARD, WIDTH), "blk.0.ffn_up.weight": (FEED_FORWARD, WIDTH),
              "blk.0.ffn_down.weight": (WIDTH, FEED_FORWARD)}
    for name, shape in shapes.items():
        # Norms in f32, as the converter writes them; matrices in f16.
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32 if len(shape) == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
