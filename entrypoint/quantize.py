"""Quantize a 16-bit GGUF with llama.cpp's `llama-quantize`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from . import process
from .errors import InputError, ToolFailed, ToolMissing

# Every type llama-quantize accepts (llama.cpp tools/quantize), in its own spelling.
QUANTIZATION_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
    "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE", "F16", "BF16", "F32",
)
# These produce garbage without an importance matrix (llama-quantize refuses most of them without one).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")
# ggml tensor types llama-quantize takes for --output-tensor-type and --token-embedding-type.
TENSOR_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_K", "q5_K", "q5_1", "q5_0", "q4_K", "q4_1", "q4_0", "q3_K",
                "q2_K", "iq4_nl", "iq4_xs")
# Types the converter can write directly, so no llama-quantize pass is needed for them.
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def normalize(name: str) -> str:
    """Map a user's spelling (any case) to llama-quantize's; raise if it is not a known type."""
    by_upper = {t.upper(): t for t in QUANTIZATION_TYPES}
    canonical = by_upper.get(name.strip().upper())
    if canonical is None:
        raise InputError(
            f"Unknown quantization '{name}'. Use one or more of: {', '.join(QUANTIZATION_TYPES)} "
            "(comma-separated, any case).",
            input_name="quantizations",
        )
    return canonical


def normalize_tensor_type(name: str, input_name: str) -> str:
    """A --output-tensor-type / --token-embedding-type value in llama-quantize's spelling ('' when unset)."""
    if not name.strip():
        return ""
    by_lower = {t.lower(): t for t in TENSOR_TYPES}
    canonical = by_lower.get(name.strip().lower())
    if canonical is None:
        raise InputError(f"Unknown tensor type '{name}'. Use one of: {', '.join(TENSOR_TYPES)}.",
                         input_name=input_name)
    return canonical


def tag_suffix(quantization: str) -> str:
    """Ollama's own tag spelling: lower-case type letters, block suffix kept (Q4_K_M -> q4_K_M)."""
    head, _, rest = quantization.partition("_")
    return head.lower() + ("_" + rest if rest else "")


def find_tool(name: str) -> str:
    """A llama.cpp tool (llama-quantize, llama-imatrix, ...): $LLAMA_QUANTIZE's folder, else PATH."""
    configured = os.environ.get("LLAMA_QUANTIZE")
    path = str(Path(configured).with_name(name)) if configured else shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        raise ToolMissing(
            f"{name} was not found. Inside the action's image it is preinstalled; when running the CLI "
            "elsewhere, run scripts/bootstrap or set LLAMA_QUANTIZE to llama-quantize in llama.cpp's build/bin.",
            tool=name)
    return path


@dataclasses.dataclass(frozen=True)
class Options:
    """What llama-quantize is given besides the type: an importance matrix, and the types of the
    output and token-embedding tensors ('' leaves llama-quantize's choice)."""

    imatrix: Path | None = None
    output_tensor_type: str = ""
    token_embedding_type: str = ""

    def flags(self) -> list[str]:
        flags = ["--imatrix", str(self.imatrix)] if self.imatrix else []
        if self.output_tensor_type:
            flags += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            flags += ["--token-embedding-type", self.token_embedding_type]
        return flags


def compute_imatrix(model: Path, calibration: Path, target: Path, seal: process.Seal) -> None:
    """Write `target`, the importance matrix of `model` (a 16/32-bit GGUF) over the calibration text."""
    process.run_sealed([find_tool("llama-imatrix"), "-m", str(model), "-f", str(calibration), "-o", str(target),
                        "-t", str(os.cpu_count() or 1), "--no-ppl"], what="llama-imatrix",
                       writes_to=target.parent, seal=seal)
    if not target.is_file():
        raise ToolFailed(f"llama-imatrix finished but wrote no {target.name}.", tool="llama-imatrix", exit_code=0)


@contextlib.contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """The path to write `target` under: a temporary name, renamed to `target` when the block completes,
    removed when it does not. An interrupted run never leaves a file in output-dir that looks finished."""
    partial = target.with_name(target.name + ".partial")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def merge_split(first_part: Path, target: Path, seal: process.Seal) -> None:
    """Write `target` from a split GGUF (llama-gguf-split finds the other parts next to the first)."""
    with written_whole(target) as partial:
        process.run_sealed([find_tool("llama-gguf-split"), "--merge", str(first_part), str(partial)],
                           what="llama-gguf-split --merge", writes_to=target.parent, seal=seal)


def quantize(source: Path, target: Path, quantization: str, seal: process.Seal, options: Options = Options()
             ) -> None:
    """Write `target` as `quantization` of `source` (a 16/32-bit GGUF)."""
    threads = str(os.cpu_count() or 1)
    with written_whole(target) as partial:
        process.run_sealed([find_tool("llama-quantize"), *options.flags(), str(source), str(partial), quantization,
                            threads], what=f"llama-quantize {quantization}", writes_to=target.parent, seal=seal)
