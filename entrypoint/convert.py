"""Convert a transformers checkpoint to GGUF with llama.cpp's own converter."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from . import gguf_header, hub, process, quantize
from .errors import RemoteCodeRefused, RepoRefused, ToolFailed, ToolMissing


def find_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from $LLAMA_CPP_DIR (set in the image and by scripts/bootstrap)."""
    root = os.environ.get("LLAMA_CPP_DIR", "")
    script = Path(root) / "convert_hf_to_gguf.py"
    if not root or not script.is_file():
        raise ToolMissing("llama.cpp's convert_hf_to_gguf.py was not found. Inside the action's image it is "
                          "preinstalled; when running the CLI elsewhere run scripts/bootstrap, or set "
                          "LLAMA_CPP_DIR to a llama.cpp source tree.", tool="llama.cpp's converter")
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
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == name and node.value is not None:
            return dict(ast.literal_eval(node.value))
    raise ToolMissing(f"llama.cpp's conversion/__init__.py has no {name}; the converter in LLAMA_CPP_DIR "
                      "is not the version this action expects.", tool="llama.cpp's converter")


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
        raise RepoRefused(f"The checkpoint has {what}, which llama.cpp's converter does not support. Supported "
                          f"text architectures ({len(supported)}): {', '.join(sorted(supported))}.",
                          input_name=input_name, title="Unsupported architecture")


# The files in which transformers looks for the name of a class to load (and, through auto_map, for the
# repository's module that holds it), of those the converters read.
CLASS_NAMING_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json", "preprocessor_config.json",
                      "processor_config.json")
# Tokenizer classes transformers does not ship and the converter loads through AutoTokenizer with
# trust_remote_code, so only a repository's code provides them (conversion/llama.py: a Llama checkpoint).
CUSTOM_CODE_TOKENIZERS = ("HybridDNATokenizer",)


def declared_code(folder: Path) -> list[str]:
    """What the folder's files declare that would import code from a repository: every auto_map (at the top
    of a file or of a sub-config), and a tokenizer class only such code provides. Each as 'file: what'."""
    found = []
    for name in CLASS_NAMING_FILES:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        data = hub.read_json(path)
        sections = [("", data)] + [(f"{key}.", value) for key, value in data.items() if isinstance(value, dict)]
        for prefix, section in sections:
            if section.get("auto_map"):
                found.append(f"{name}: {prefix}auto_map {json.dumps(section['auto_map'])[:300]}")
            if section.get("tokenizer_class") in CUSTOM_CODE_TOKENIZERS:
                found.append(f"{name}: {prefix}tokenizer_class {section['tokenizer_class']} (only a repository's "
                             "code provides it)")
    return found


def check_no_custom_code(folders: list[Path], input_name: str) -> None:
    """Refuse, before any weights are read, a checkpoint (or an adapter's base) that declares code of its
    own: the converter would hand it to transformers, which imports it (trust_remote_code), fetching a
    module another repository names first. The sealed converter would be stopped there anyway."""
    found = [entry for folder in folders for entry in declared_code(folder)]
    if found:
        raise RemoteCodeRefused(f"The checkpoint declares code of its own, which transformers would import and run "
                                f"while converting: {'; '.join(found)}. No code from a repository runs here. Publish "
                                "a checkpoint saved with the classes transformers ships (remove auto_map, e.g. "
                                "save_pretrained from a model and tokenizer loaded without trust_remote_code).",
                                attempt="declared", input_name=input_name)


# llama.cpp's pooling types (gguf-py PoolingType). Ollama 0.34 serves /api/embed from llama-server's
# OpenAI-style /v1/embeddings, which refuses NONE (token embeddings) and RANK (a reranker's scores).
SENTENCE_POOLING = {1: "mean", 2: "cls", 3: "last"}


def check_embedding_model(metadata: dict[str, Any], input_name: str) -> int:
    """Refuse an embedding GGUF without sentence pooling; return its embedding size. (Any architecture the
    converter writes, llama-server runs: both come from the same llama.cpp tree.)"""
    arch = str(metadata.get("general.architecture", ""))
    pooling = metadata.get(f"{arch}.pooling_type")
    if pooling is None:
        raise RepoRefused("The embedding model has no pooling: the converter takes it from the sentence-transformers "
                          "files modules.json and 1_Pooling/config.json. Without it there is no sentence embedding. "
                          "Add them (SentenceTransformer.save).", input_name=input_name, title="No pooling")
    if pooling not in SENTENCE_POOLING:
        raise RepoRefused(f"The embedding model's pooling type is {pooling} (none or rank): it gives token embeddings "
                          "or reranking scores, which Ollama's /api/embed cannot serve. Publish a checkpoint with "
                          "mean, CLS or last-token pooling.", input_name=input_name, title="No pooling")
    return int(metadata[f"{arch}.embedding_length"])


def check_encoder_has_pooling(config: dict[str, Any], supported: dict[str, str], has_pooling: bool,
                              input_name: str) -> None:
    """An encoder (converted by the converter's bert module) can only be published as an embedding model,
    and that needs the sentence-transformers pooling files."""
    if supported.get(architecture(config)) == "bert" and not has_pooling:
        raise RepoRefused(f"The checkpoint is an encoder ({architecture(config)}), which Ollama serves as an "
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


def convert(checkpoint: Path, target: Path, outtype: str, model_name: str, seal: process.Seal) -> None:
    """Write `target` as a GGUF of `checkpoint` with tensors in `outtype` (f16, bf16, f32 or q8_0).

    `model_name` becomes general.name; without it the converter would use the temp folder's name.
    """
    command = [str(find_converter()), str(checkpoint), "--outfile", str(target), "--outtype", outtype,
               "--model-name", model_name]
    process.run_sealed(command, what="convert_hf_to_gguf.py", writes_to=target.parent, seal=seal, python=True)
    if not target.is_file():
        raise ToolFailed(f"The converter finished but wrote no {target.name}.", tool="convert_hf_to_gguf.py",
                         exit_code=0, title="Conversion failed")


def convert_streamed(checkpoint: Path, targets: dict[str, Path], outtype: str, model_name: str,
                     seal: process.Seal, options: quantize.Options, feed_folder: Path | None = None) -> None:
    """Write every GGUF of `targets` ({quantization: path}, one folder) in one pass over `checkpoint`
    (entrypoint/stream.py): each tensor the converter makes in `outtype` is quantized as llama-quantize would
    quantize it from the converter's file, which is never written. `feed_folder`: the weights' bytes arrive
    while they are read (feed.py)."""
    converter = find_converter()
    llama_quantize = Path(quantize.find_tool("llama-quantize"))
    folder = next(iter(targets.values())).parent
    plan = folder / ".stream-plan.gguf"  # the converter's header, its data a hole: llama-quantize --dry-run reads it
    with contextlib.ExitStack() as finishing:
        partials = {quant: finishing.enter_context(quantize.written_whole(path)) for quant, path in targets.items()}
        command = ["entrypoint.stream", "--converter", str(converter), "--llama-quantize", str(llama_quantize),
                   "--ggml-library", str(llama_quantize.with_name("libggml-base.so")), "--plan", str(plan),
                   *[f"--output={quant}={path}" for quant, path in partials.items()],
                   *([f"--imatrix={options.imatrix}"] if options.imatrix else []),
                   *[f"--quantize-flag={flag}" for flag in options.flags()],
                   *([f"--feed={feed_folder}"] if feed_folder else []),
                   "--", str(checkpoint), "--outtype", outtype, "--model-name", model_name]
        try:
            process.run_sealed(command, what=f"convert_hf_to_gguf.py streamed into {', '.join(targets)}",
                               writes_to=folder, seal=seal,
                               code_roots=[process.APP_ROOT, converter.parent, llama_quantize.parent])
        finally:
            plan.unlink(missing_ok=True)


def check_adapter(adapter_config: dict[str, Any], input_name: str) -> None:
    """Refuse, before any download of weights, an adapter the GGUF-level merge would fail on or get wrong."""
    kind = adapter_config.get("peft_type", "")
    if kind != "LORA":
        raise RepoRefused(f"The adapter is a peft {kind or 'unknown'} adapter; only LoRA adapters can be merged.",
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
        raise RepoRefused(f"The adapter uses {', '.join(unsupported)}, which llama.cpp's LoRA merge cannot apply "
                          "exactly. Merge it with peft (merge_and_unload), save the model and publish that.",
                          input_name=input_name, title="Unsupported adapter")


def convert_adapter(adapter: Path, base: Path, target: Path, seal: process.Seal) -> None:
    """Write `target`, the LoRA adapter as a GGUF (f16); `base` holds its base model's config."""
    command = [str(find_converter().with_name("convert_lora_to_gguf.py")), str(adapter), "--base", str(base),
               "--outfile", str(target), "--outtype", "f16"]
    process.run_sealed(command, what="convert_lora_to_gguf.py", writes_to=target.parent, seal=seal, python=True)
    if not target.is_file():
        raise ToolFailed(f"The converter finished but wrote no {target.name}.", tool="convert_lora_to_gguf.py",
                         exit_code=0, title="Conversion failed")


def merge_adapter(base: Path, adapter: Path, target: Path, seal: process.Seal) -> None:
    """Write `target`: the base GGUF with the adapter GGUF merged into its weights (llama-export-lora)."""
    process.run_sealed([quantize.find_tool("llama-export-lora"), "-m", str(base), "--lora", str(adapter),
                        "-o", str(target), "-t", str(os.cpu_count() or 1)], what="llama-export-lora",
                       writes_to=target.parent, seal=seal)
    if not target.is_file():
        raise ToolFailed(f"llama-export-lora finished but wrote no {target.name}.", tool="llama-export-lora",
                         exit_code=0, title="Merge failed")


def convert_projector(checkpoint: Path, target: Path, seal: process.Seal) -> None:
    """Write `target`, the vision encoder and projector of `checkpoint` as llama.cpp's mmproj GGUF (f16)."""
    command = [str(find_converter()), str(checkpoint), "--mmproj", "--outfile", str(target), "--outtype", "f16"]
    process.run_sealed(command, what="convert_hf_to_gguf.py --mmproj", writes_to=target.parent, seal=seal,
                       python=True)
    if not target.is_file():
        raise ToolFailed(f"The converter finished but wrote no {target.name}.", tool="convert_hf_to_gguf.py",
                         exit_code=0, title="Conversion failed")


def adds_bos(gguf_path: Path) -> bool:
    """Whether the GGUF's tokenizer prepends BOS to every prompt by itself."""
    return bool(gguf_header.read_metadata(gguf_path).get("tokenizer.ggml.add_bos_token", False))


# The module names of the token embedding in the converter's architectures (its rows: the vocabulary);
# matched whole, so that BERT's position_embeddings is not taken for it.
_EMBEDDING_MODULES = {"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embedding", "embeddings"}
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_HEADER_LIMIT = 100_000_000  # a safetensors header is metadata: kilobytes to a few megabytes


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """The shape of every tensor the converter reads (the top-level model*.safetensors files), from their
    headers alone."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        if path.is_symlink() or not path.is_file():
            raise RepoRefused(f"{path.name} is not a regular file (a link, say): refused.", title="Bad checkpoint")
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(_HEADER_LIMIT, path.stat().st_size - 8):
                raise RepoRefused(f"{path.name} is not a safetensors file (its header claims {length} bytes).",
                                  title="Bad checkpoint")
            try:
                header = json.loads(f.read(length))
            except (ValueError, RecursionError) as exc:
                raise RepoRefused(f"{path.name} has no valid safetensors header: {exc}",
                                  title="Bad checkpoint") from exc
        if not isinstance(header, dict):
            raise RepoRefused(f"{path.name} has no valid safetensors header (not a JSON object).",
                              title="Bad checkpoint")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise RepoRefused(f"{path.name}: the tensor {name[:100]} has no valid shape ({str(shape)[:100]}).",
                                  title="Bad checkpoint")
            shapes[name] = shape
    return shapes


def largest_tensor(shapes: dict[str, list[int]]) -> int:
    """The element count of the largest tensor (what the tools' memory follows: preflight.tool_memory)."""
    return max((math.prod(shape) for shape in shapes.values()), default=0)


def check_config_matches_weights(config: dict[str, Any], shapes: dict[str, list[int]], input_name: str) -> None:
    """Refuse a config.json that claims more than the weights hold: the converter trusts it, and pads a
    vocabulary of vocab_size tokens (an absurd one makes gigabytes of padding) or looks for layers and
    dimensions that are not there.

    Two kinds of bounds. Whatever the tensors are called: no dimension can exceed the largest dimension of
    any tensor (a vocabulary is one tensor's rows), and no checkpoint has more layers than tensors. And where
    the token embedding and the layers go by the names the converter's architectures use, the exact ones."""
    text_config = config.get("text_config")
    text: dict[str, Any] = text_config if isinstance(text_config, dict) else config
    vocab, hidden, depth = text.get("vocab_size"), text.get("hidden_size"), text.get("num_hidden_layers")
    embeddings = [shape for name, shape in shapes.items()
                  if name.rsplit(".", 2)[-2:] in ([module, "weight"] for module in _EMBEDDING_MODULES)
                  and len(shape) == 2]
    embedding = max(embeddings, default=None)  # of several (a vision model's), the text's is the largest
    layers = [int(m.group(1)) + 1 for name in shapes if (m := _LAYER_INDEX.search(name))]
    problems = []
    if embedding and isinstance(vocab, int) and vocab > embedding[0]:
        problems.append(f"vocab_size {vocab:,}, but its token embedding has {embedding[0]:,} rows")
    if embedding and isinstance(hidden, int) and hidden > max(embedding):
        problems.append(f"hidden_size {hidden:,}, but its token embedding is {embedding[0]:,} x {embedding[1]:,}")
    if layers and isinstance(depth, int) and depth > max(layers):
        problems.append(f"num_hidden_layers {depth:,}, but its weights have {max(layers):,} layers")
    if shapes and not problems:
        largest_dimension = max(max(shape, default=0) for shape in shapes.values())
        for key in ("vocab_size", "hidden_size", "intermediate_size"):
            value = text.get(key)
            if isinstance(value, int) and value > largest_dimension:
                problems.append(f"{key} {value:,}, but no tensor of its weights has a dimension over "
                                f"{largest_dimension:,}")
        if isinstance(depth, int) and depth > len(shapes):
            problems.append(f"num_hidden_layers {depth:,}, but its weights are {len(shapes):,} tensors in all")
    if problems:
        raise RepoRefused(f"config.json does not match the weights: it says {'; '.join(problems)}. Fix config.json "
                          "(the converter would trust it).", input_name=input_name, title="Config does not match")
