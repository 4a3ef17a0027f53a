"""Checkpoints of users' shapes for the scale benchmark: SmolLM2-135M embedded in a wider, deeper Llama.

The shapes are those of the fine-tunes people publish (about 1B, 3B and 8B parameters: Llama 3.x widths,
grouped-query attention, bf16, in the Hub's 5 GB shards with an index), with SmolLM2's tokenizer, vocabulary
and 64-wide heads. SmolLM2's weights sit in the first 576 dimensions of the residual stream, its heads in
the first query heads of their groups, its MLP in the first neurons, its 30 layers first. Everything else
is random: of normal magnitude where it only reads (so the converter and llama-quantize see ordinary data:
timing depends on that), near zero where it writes into the residual stream (output projections, down
projections, the embedding's extra columns). So the model still answers and stops as SmolLM2 does, and the
smoke test and parity run as for a real fine-tune.

RMSNorm: the extra dimensions hold almost nothing, so the mean of squares over the wide stream is that of
SmolLM2's 576 dimensions times 576/width; the norm weights of those dimensions, and epsilon, are scaled to
give SmolLM2's values back.

    python -m bench.shapes SMOLLM2_CHECKPOINT TARGET --shape 8b
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

SHARD_BYTES = 5 * 10**9  # the Hub's shard size (transformers' save_pretrained default is 5GB)
TINY_STD = 1e-5  # what writes into the residual stream outside SmolLM2: small enough to leave its answers
READ_STD = 0.02  # everything else: transformers' initializer_range


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int  # query heads, 64 wide as SmolLM2's
    kv_heads: int
    intermediate: int
    layers: int
    tied: bool  # Llama 3.2 1B and 3B tie the output to the embedding, Llama 3.1 8B does not


# Llama 3.2 1B / 3.2 3B / 3.1 8B widths and MLPs with 64-wide heads; at least SmolLM2's 30 layers, and 35 for
# 8B to make up for the smaller vocabulary (49,152 tokens, against Llama 3's 128,256).
SHAPES = {
    "1b": Shape(hidden=2048, heads=32, kv_heads=8, intermediate=4096, layers=30, tied=True),
    "3b": Shape(hidden=3072, heads=48, kv_heads=16, intermediate=8192, layers=30, tied=True),
    "8b": Shape(hidden=4096, heads=64, kv_heads=16, intermediate=14336, layers=35, tied=False),
}
HEAD_DIM = 64


def tensor_shapes(shape: Shape, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, in the order transformers saves a Llama."""
    d, q, kv = shape.hidden, shape.heads * HEAD_DIM, shape.kv_heads * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        i = shape.intermediate
        shapes |= {p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                   p + "mlp.down_proj.weight": (d, i), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}
    shapes["model.norm.weight"] = (d,)
    if not shape.tied:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def shards(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names per shard: in order, a new shard when the next tensor would pass SHARD_BYTES."""
    out: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        nbytes = 2 * math.prod(dims)
        if out[-1] and size + nbytes > SHARD_BYTES:
            out.append([])
            size = 0
        out[-1].append(name)
        size += nbytes
    return out


def query_slot(head: int, small_group: int, group: int) -> int:
    """Where SmolLM2's query head goes: the same place in its key/value head's group, so that it still
    attends with its own key and value heads (which sit first)."""
    return head // small_group * group + head % small_group


class Builder:
    def __init__(self, small: dict, config: dict, shape: Shape, seed: int):
        import torch
        self.torch, self.small, self.shape, self.seed = torch, small, shape, seed
        self.d_small = config["hidden_size"]
        self.heads_small, self.kv_small = config["num_attention_heads"], config["num_key_value_heads"]
        self.i_small, self.layers_small = config["intermediate_size"], config["num_hidden_layers"]
        self.norm_scale = math.sqrt(self.d_small / shape.hidden)

    def _random(self, name: str, dims: tuple[int, ...], std: float):
        torch = self.torch
        tensor_seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)  # each tensor alone reproducible
        generator = torch.Generator().manual_seed(self.seed * 2**32 + tensor_seed)
        return torch.randn(dims, generator=generator, dtype=torch.float32).mul_(std).to(torch.bfloat16)

    def tensor(self, name: str, dims: tuple[int, ...]):
        torch, s, d = self.torch, self.small, self.d_small
        if name.endswith("norm.weight"):
            out = torch.ones(dims, dtype=torch.bfloat16)
            if name.startswith("model.norm") or int(name.split(".")[2]) < self.layers_small:
                out[:d] = (s[name].float() * self.norm_scale).to(torch.bfloat16)
            return out
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out = self._random(name, dims, TINY_STD if name.startswith("model.") else READ_STD)
            out[:, :d] = s["model.embed_tokens.weight"]
            return out
        layer, kind = int(name.split(".")[2]), name.split(".", 3)[3]
        writes = kind in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
        out = self._random(name, dims, TINY_STD if writes else READ_STD)
        if layer >= self.layers_small:
            return out
        w = s[name]
        group_small, group = self.heads_small // self.kv_small, self.shape.heads // self.shape.kv_heads
        if kind == "self_attn.q_proj.weight":
            for head in range(self.heads_small):
                slot = query_slot(head, group_small, group)
                out[slot * HEAD_DIM:(slot + 1) * HEAD_DIM, :d] = w[head * HEAD_DIM:(head + 1) * HEAD_DIM]
        elif kind in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            out[:w.shape[0], :d] = w
        elif kind == "self_attn.o_proj.weight":
            for head in range(self.heads_small):
                slot = query_slot(head, group_small, group)
                out[:d, slot * HEAD_DIM:(slot + 1) * HEAD_DIM] = w[:, head * HEAD_DIM:(head + 1) * HEAD_DIM]
        elif kind in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            out[:self.i_small, :d] = w
        elif kind == "mlp.down_proj.weight":
            out[:d, :self.i_small] = w
        return out


def _write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], make) -> None:
    """A safetensors file written one tensor at a time (the header first: every size is known)."""
    header, offset = {}, 0
    for name in names:
        nbytes = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    import torch
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            f.write(make(name, shapes[name]).contiguous().view(dtype=torch.int16).numpy().tobytes())


def build(source: Path, target: Path, shape_name: str, seed: int = 0) -> int:
    from safetensors.torch import load_file

    shape = SHAPES[shape_name]
    config = json.loads((source / "config.json").read_text())
    small = load_file(source / "model.safetensors")
    shapes = tensor_shapes(shape, config["vocab_size"])
    builder = Builder(small, config, shape, seed)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    groups = shards(shapes)
    weight_map = {}
    for index, names in enumerate(groups, 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        print(f"bench.shapes: writing {file} ({len(names)} tensors)", flush=True)
        _write_shard(partial / file, names, shapes, builder.tensor)
        weight_map |= dict.fromkeys(names, file)
    total = sum(2 * math.prod(dims) for dims in shapes.values())
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config |= {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
               "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": HEAD_DIM,
               "tie_word_embeddings": shape.tied, "rms_norm_eps": config["rms_norm_eps"] * builder.norm_scale ** 2,
               "_model_name_or_path": f"SmolLM2-135M-Instruct in a {shape_name} Llama shape (bench/shapes.py)"}
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    for item in source.iterdir():  # tokenizer, chat template, generation config, license
        if item.is_file() and not (partial / item.name).exists() and not item.name.startswith("model"):
            shutil.copy2(item, partial / item.name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return sum(math.prod(dims) for dims in shapes.values())


def parameters(shape_name: str, vocab: int = 49152) -> int:
    return sum(math.prod(dims) for dims in tensor_shapes(SHAPES[shape_name], vocab).values())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the SmolLM2 checkpoint folder ($SMOLLM2_CHECKPOINT)")
    parser.add_argument("target", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = build(args.source, args.target, args.shape, args.seed)
    print(f"wrote {args.target}: {count / 1e9:.2f}B parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
