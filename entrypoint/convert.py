"""Convert a transformers checkpoint to GGUF with llama.cpp's own converter."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

from . import gguf_header, process, quantize
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


def text_architectures(converter_package_init: str) -> dict[str, str]:
    """The architectures the converter registers for text models, each with its conversion module: the
    TEXT_MODEL_MAP of its conversion/__init__.py (read as source: importing it would import torch)."""
    return _model_map(converter_package_init, "TEXT_MODEL_MAP")


def projector_architectures(converter_package_init: str) -> dict[str, str]:
    """The architectures whose vision (or audio) encoder the converter writes with --mmproj."""
    return _model_map(converter_package_init, "MMPROJ_MODEL_MAP")


def _model_map(converter_package_init: str, name: str) -> dict[str, str]:
    for node in ast.parse(converter_package_init).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == name:
            return dict(ast.literal_eval(node.value))
    raise PublishError(f"llama.cpp's conversion/__init__.py has no {name}; the converter in LLAMA_CPP_DIR "
                       "is not the version this action expects.", title="llama.cpp converter missing")


def architecture(config: dict[str, Any]) -> str:
    """The architecture the converter will use for a config.json (a text_config's wins, as there)."""
    for source in (config.get("text_config") or {}, config):
        names = source.get("architectures") or []
        if names:
            return str(names[0])
    return ""


def check_architecture(config: dict[str, Any], supported: dict[str, str], input_name: str) -> None:
    """Refuse, before any download, a checkpoint the converter cannot convert."""
    name = architecture(config)
    if name not in supported:
        what = f"architecture '{name}'" if name else "no architecture (config.json lists no 'architectures')"
        raise PublishError(f"The checkpoint has {what}, which llama.cpp's converter does not support. Supported "
                           f"text architectures ({len(supported)}): {', '.join(sorted(supported))}.",
                           input_name=input_name, title="Unsupported architecture")


# llama.cpp's pooling types (gguf-py PoolingType). Ollama 0.34 serves /api/embed from llama-server's
# OpenAI-style /v1/embeddings, which refuses NONE (token embeddings) and RANK (a reranker's scores).
SENTENCE_POOLING = {1: "mean", 2: "cls", 3: "last"}


def check_embedding_model(metadata: dict[str, Any], input_name: str) -> int:
    """Refuse an embedding GGUF without sentence pooling; return its embedding size. (Any architecture the
    converter writes, llama-server runs: both come from the same llama.cpp tree.)"""
    arch = str(metadata.get("general.architecture", ""))
    pooling = metadata.get(f"{arch}.pooling_type")
    if pooling is None:
        raise PublishError("The embedding model has no pooling: the converter takes it from the sentence-transformers "
                           "files modules.json and 1_Pooling/config.json. Without it there is no sentence embedding. "
                           "Add them (SentenceTransformer.save).", input_name=input_name, title="No pooling")
    if pooling not in SENTENCE_POOLING:
        raise PublishError(f"The embedding model's pooling type is {pooling} (none or rank): it gives token embeddings "
                           "or reranking scores, which Ollama's /api/embed cannot serve. Publish a checkpoint with "
                           "mean, CLS or last-token pooling.", input_name=input_name, title="No pooling")
    return int(metadata[f"{arch}.embedding_length"])


def check_encoder_has_pooling(config: dict[str, Any], supported: dict[str, str], has_pooling: bool,
                              input_name: str) -> None:
    """An encoder (converted by the converter's bert module) can only be published as an embedding model,
    and that needs the sentence-transformers pooling files."""
    if supported.get(architecture(config)) == "bert" and not has_pooling:
        raise PublishError(f"The checkpoint is an encoder ({architecture(config)}), which Ollama serves as an "
                           "embedding model; that needs the pooling of sentence-transformers' modules.json and "
                           "1_Pooling/config.json, which the repo lacks. Save it with SentenceTransformer.save.",
                           input_name=input_name, title="No pooling")


def supported_architectures() -> dict[str, str]:
    return text_architectures(_converter_init())


def is_vision_model(config: dict[str, Any]) -> bool:
    """A checkpoint whose own architecture has an encoder the converter writes as a projector (--mmproj)."""
    names = config.get("architectures") or [""]
    return bool(config.get("vision_config")) and names[0] in projector_architectures(_converter_init())


def _converter_init() -> str:
    return (find_converter().parent / "conversion" / "__init__.py").read_text(encoding="utf-8")


def convert(checkpoint: Path, target: Path, outtype: str, model_name: str) -> None:
    """Write `target` as a GGUF of `checkpoint` with tensors in `outtype` (f16, bf16, f32 or q8_0).

    `model_name` becomes general.name; without it the converter would use the temp folder's name.
    """
    command = [sys.executable, str(find_converter()), str(checkpoint), "--outfile", str(target),
               "--outtype", outtype, "--model-name", model_name]
    process.run_logged(command, what="convert_hf_to_gguf.py")
    if not target.is_file():
        raise PublishError(f"The converter finished but wrote no {target.name}.", title="Conversion failed")


def check_adapter(adapter_config: dict[str, Any], input_name: str) -> None:
    """Refuse, before any download of weights, an adapter the GGUF-level merge would fail on or get wrong."""
    kind = adapter_config.get("peft_type", "")
    if kind != "LORA":
        raise PublishError(f"The adapter is a peft {kind or 'unknown'} adapter; only LoRA adapters can be merged.",
                           input_name=input_name, title="Unsupported adapter")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    # What llama.cpp's LoRA converter refuses (DoRA, whole trained modules), or converts wrongly (rsLoRA's
    # scale, per-module ranks and alphas) or drops when merging (a LoRA on a tied lm_head).
    unsupported = [name for name, used in (
        ("DoRA (use_dora)", adapter_config.get("use_dora")),
        ("rsLoRA (use_rslora)", adapter_config.get("use_rslora")),
        ("modules_to_save", adapter_config.get("modules_to_save")),
        ("trainable_token_indices", adapter_config.get("trainable_token_indices")),
        ("per-module ranks or alphas (rank_pattern, alpha_pattern)",
         adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern")),
        ("a LoRA on lm_head", "lm_head" in targets)) if used]
    if unsupported:
        raise PublishError(f"The adapter uses {', '.join(unsupported)}, which llama.cpp's LoRA merge cannot apply "
                           "exactly. Merge it with peft (merge_and_unload), save the model and publish that.",
                           input_name=input_name, title="Unsupported adapter")


def convert_adapter(adapter: Path, base: Path, target: Path) -> None:
    """Write `target`, the LoRA adapter as a GGUF (f16); `base` holds its base model's config."""
    command = [sys.executable, str(find_converter().with_name("convert_lora_to_gguf.py")), str(adapter), "--base",
               str(base), "--outfile", str(target), "--outtype", "f16"]
    process.run_logged(command, what="convert_lora_to_gguf.py")
    if not target.is_file():
        raise PublishError(f"The converter finished but wrote no {target.name}.", title="Conversion failed")


def merge_adapter(base: Path, adapter: Path, target: Path) -> None:
    """Write `target`: the base GGUF with the adapter GGUF merged into its weights (llama-export-lora)."""
    process.run_logged([quantize.find_tool("llama-export-lora"), "-m", str(base), "--lora", str(adapter),
                        "-o", str(target),
                        "-t", str(os.cpu_count() or 1)], what="llama-export-lora")
    if not target.is_file():
        raise PublishError(f"llama-export-lora finished but wrote no {target.name}.", title="Merge failed")


def convert_projector(checkpoint: Path, target: Path) -> None:
    """Write `target`, the vision encoder and projector of `checkpoint` as llama.cpp's mmproj GGUF (f16)."""
    command = [sys.executable, str(find_converter()), str(checkpoint), "--mmproj", "--outfile", str(target),
               "--outtype", "f16"]
    process.run_logged(command, what="convert_hf_to_gguf.py --mmproj")
    if not target.is_file():
        raise PublishError(f"The converter finished but wrote no {target.name}.", title="Conversion failed")


def adds_bos(gguf_path: Path) -> bool:
    """Whether the GGUF's tokenizer prepends BOS to every prompt by itself."""
    return bool(gguf_header.read_metadata(gguf_path).get("tokenizer.ggml.add_bos_token", False))
