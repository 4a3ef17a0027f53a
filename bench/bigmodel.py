"""Build the benchmark's larger checkpoint: SmolLM2's architecture, about 3x the parameters.

It keeps SmolLM2's width, tokenizer and chat template and adds layers (transformers builds them with
its own random initialization). The added layers' output projections (o_proj, down_proj) are random
too but drawn small, so the model still answers and stops by itself: the action's smoke test needs
that, and a wholly random model would ramble until the token limit. Every tensor is random data of
normal magnitude to the converter and to llama-quantize, which is what the timing depends on.

    python -m bench.bigmodel SMOLLM2_CHECKPOINT TARGET [--layers 106] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WEIGHTS = "model.safetensors"
# Standard deviation of the added layers' output projections: small enough that the residual
# stream, and so the answers, stay SmolLM2's (checked by the benchmark with the action's smoke test).
OUTPUT_PROJECTION_STD = 1e-4


def build(source: Path, target: Path, layers: int, seed: int) -> int:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    base_layers = config.num_hidden_layers
    if layers <= base_layers:
        raise SystemExit(f"--layers must exceed the checkpoint's {base_layers}")
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(load_file(source / WEIGHTS), strict=False)
    added = {f"model.layers.{i}." for i in range(base_layers, layers)}
    stray = [k for k in missing if not any(k.startswith(p) for p in added) and k != "lm_head.weight"]
    if stray or unexpected:
        raise SystemExit(f"unexpected state dict mismatch: missing {stray}, unexpected {unexpected}")
    with torch.no_grad():
        for layer in model.model.layers[base_layers:]:
            layer.self_attn.o_proj.weight.normal_(0.0, OUTPUT_PROJECTION_STD)
            layer.mlp.down_proj.weight.normal_(0.0, OUTPUT_PROJECTION_STD)
    model = model.to(torch.bfloat16)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True, max_shard_size="20GB")
    for item in source.iterdir():  # tokenizer, chat template, generation config, license
        if item.is_file() and not (partial / item.name).exists() and not item.name.startswith("model"):
            shutil.copy2(item, partial / item.name)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bigmodel", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the SmolLM2 checkpoint folder ($SMOLLM2_CHECKPOINT)")
    parser.add_argument("target", type=Path)
    parser.add_argument("--layers", type=int, default=106)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = build(args.source, args.target, args.layers, args.seed)
    print(f"wrote {args.target}: {count / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
