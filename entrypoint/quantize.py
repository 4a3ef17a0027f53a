"""Quantize a 16-bit GGUF with llama.cpp's `llama-quantize`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import process
from .errors import PublishError

# Every type llama-quantize accepts (llama.cpp tools/quantize), in its own spelling.
QUANTIZATION_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
    "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE", "F16", "BF16", "F32",
)
# These produce garbage without an importance matrix; support for one comes with its own input.
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")
# Types the converter can write directly, so no llama-quantize pass is needed for them.
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def normalize(name: str) -> str:
    """Map a user's spelling (any case) to llama-quantize's; raise if it is not a known type."""
    by_upper = {t.upper(): t for t in QUANTIZATION_TYPES}
    canonical = by_upper.get(name.strip().upper())
    if canonical is None:
        raise PublishError(
            f"Unknown quantization '{name}'. Use one or more of: {', '.join(QUANTIZATION_TYPES)} "
            "(comma-separated, any case).",
            input_name="quantizations",
        )
    if canonical in NEEDS_IMATRIX:
        raise PublishError(
            f"Quantization {canonical} needs an importance matrix, which this action does not build yet. "
            "Choose a K-quant such as Q4_K_M or IQ4_XS instead.",
            input_name="quantizations",
        )
    return canonical


def tag_suffix(quantization: str) -> str:
    """Ollama's own tag spelling: lower-case type letters, block suffix kept (Q4_K_M -> q4_K_M)."""
    head, _, rest = quantization.partition("_")
    return head.lower() + ("_" + rest if rest else "")


def find_llama_quantize() -> str:
    """The llama-quantize binary: $LLAMA_QUANTIZE, else the one on PATH."""
    path = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if not path or not os.access(path, os.X_OK):
        raise PublishError(
            "llama-quantize was not found. Inside the action's image it is preinstalled; when running the "
            "CLI elsewhere, run scripts/bootstrap or set LLAMA_QUANTIZE to the binary.",
            title="llama-quantize missing",
        )
    return path


def quantize(source: Path, target: Path, quantization: str) -> None:
    """Write `target` as `quantization` of `source` (a 16/32-bit GGUF). The file appears under its
    name only when complete, so an interrupted run never leaves a GGUF that looks finished."""
    threads = str(os.cpu_count() or 1)
    partial = target.with_name(target.name + ".partial")
    try:
        process.run_logged([find_llama_quantize(), str(source), str(partial), quantization, threads],
                           what=f"llama-quantize {quantization}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
