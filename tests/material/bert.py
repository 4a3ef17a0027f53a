"""A tiny sentence-transformers embedding model: BERT (2 layers, 64 dimensions, seeded random weights)
with a real WordPiece vocabulary, bge-small-en-v1.5's 30,522 tokens from llama.cpp's
models/ggml-vocab-bert-bge.gguf, and mean pooling (modules.json, 1_Pooling/config.json).

    python -m tests.material.bert OUT_DIR [--no-pooling]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from entrypoint.gguf_header import read_metadata

HIDDEN = 64
MAX_SEQ_LENGTH = 128
_CONTROL = 3  # llama.cpp token type


def wordpiece_vocab() -> list[str]:
    """The vocab.txt lines: the GGUF keeps word starts as '▁piece' and continuations bare, WordPiece
    writes continuations as '##piece'; control tokens ([CLS], [SEP], ...) are the same in both."""
    metadata = read_metadata(Path(os.environ["LLAMA_CPP_DIR"]) / "models" / "ggml-vocab-bert-bge.gguf")
    vocab = []
    for token, kind in zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"], strict=True):
        if kind == _CONTROL:
            vocab.append(token)
        elif token.startswith("\u2581"):
            vocab.append(token[1:])
        else:
            vocab.append("##" + token)
    return vocab


def build(out_dir: Path, pooling: bool = True) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab()
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True,
                      model_max_length=512).save_pretrained(out_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, type_vocab_size=2)
    BertModel(config).eval().save_pretrained(out_dir, safe_serialization=True)
    if pooling:  # what SentenceTransformer.save writes; the converter reads the pooling mode from it
        (out_dir / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        # Shorter than the 512 positions: sentence-transformers cuts inputs at max_seq_length.
        (out_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ_LENGTH,
                                                                       "do_lower_case": False}))
        (out_dir / "1_Pooling").mkdir(exist_ok=True)
        (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))


if __name__ == "__main__":
    build(Path(sys.argv[1]), pooling="--no-pooling" not in sys.argv[2:])
