"""Convert a transformers checkpoint to GGUF with llama.cpp's own converter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import process
from .errors import PublishError


def find_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from $LLAMA_CPP_DIR (set in the image and by scripts/bootstrap)."""
    root = os.environ.get("LLAMA_CPP_DIR", "")
    script = Path(root) / "convert_hf_to_gguf.py"
    if not root or not script.is_file():
        raise PublishError("llama.cpp's convert_hf_to_gguf.py was not found. Inside the action's image it is "
                           "preinstalled; when running the CLI elsewhere run scripts/bootstrap, or set "
                           "LLAMA_CPP_DIR to a llama.cpp source tree.", title="llama.cpp converter missing")
    return script


def convert(checkpoint: Path, target: Path, outtype: str, model_name: str) -> None:
    """Write `target` as a GGUF of `checkpoint` with tensors in `outtype` (f16, bf16, f32 or q8_0).

    `model_name` becomes general.name; without it the converter would use the temp folder's name.
    """
    command = [sys.executable, str(find_converter()), str(checkpoint), "--outfile", str(target),
               "--outtype", outtype, "--model-name", model_name]
    process.run_logged(command, what="convert_hf_to_gguf.py")
    if not target.is_file():
        raise PublishError(f"The converter finished but wrote no {target.name}.", title="Conversion failed")


def adds_bos(gguf_path: Path) -> bool:
    """Whether the GGUF's tokenizer prepends BOS to every prompt by itself."""
    from gguf import GGUFReader  # memory-maps the file; only the metadata is read

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[field.data[0]][0]) if field is not None else False
