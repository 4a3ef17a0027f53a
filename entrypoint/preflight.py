"""Preflight: estimate the peak disk the run needs on each filesystem and the memory its checks
need, from the checkpoint's size and the requested quantizations (following the same plan as the
pipeline), and stop before any download when either does not fit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import github
from .errors import NotEnoughResources

# Approximate bits per weight of each type on real models (llama.cpp's reported sizes); small models
# keep more tensors at high precision, hence the margin below.
BITS_PER_WEIGHT = {
    "Q4_0": 4.6, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q2_K": 3.0, "Q2_K_S": 2.9, "Q3_K_S": 3.5, "Q3_K_M": 3.9,
    "Q3_K_L": 4.3, "Q4_K_S": 4.6, "Q4_K_M": 4.9, "Q5_K_S": 5.5, "Q5_K_M": 5.7, "Q6_K": 6.6, "Q8_0": 8.5,
    "IQ1_S": 1.6, "IQ1_M": 1.8, "IQ2_XXS": 2.1, "IQ2_XS": 2.3, "IQ2_S": 2.5, "IQ2_M": 2.7, "IQ3_XXS": 3.1,
    "IQ3_XS": 3.3, "IQ3_S": 3.5, "IQ3_M": 3.7, "IQ4_NL": 4.6, "IQ4_XS": 4.3, "TQ1_0": 1.7,
    "TQ2_0": 2.1, "MXFP4_MOE": 8.5, "F16": 16, "BF16": 16, "F32": 32,
}
MARGIN = 1.25
# Checkpoints are stored in 16 bits almost always; an f32 checkpoint only makes the estimate generous.
CHECKPOINT_BYTES_PER_WEIGHT = 2


def quantized_bytes(checkpoint_bytes: int, quantization: str) -> int:
    return int(checkpoint_bytes / CHECKPOINT_BYTES_PER_WEIGHT * BITS_PER_WEIGHT[quantization] / 8 * MARGIN)


def largest_quantized(checkpoint_bytes: int, quantizations: tuple[str, ...]) -> tuple[str, int]:
    """The quantization that needs the most memory to load, and its estimated size."""
    largest = max(quantizations, key=lambda q: BITS_PER_WEIGHT[q])
    return largest, quantized_bytes(checkpoint_bytes, largest)


def estimate(checkpoint_bytes: int, quantizations: tuple[str, ...], intermediate: str | None, downloaded: bool,
             ollama_copies: bool, merging: bool = False, pull_back: bool = False,
             window: int = 0) -> list[dict[str, int]]:
    """Bytes held at each phase by role: 'work' (scratch), 'outputs' (GGUFs kept) and 'ollama' (its blobs;
    nothing when the GGUFs are handed to Ollama as hard links, i.e. ollama_copies is False). intermediate: the
    type of the GGUF file converted first, None when the weights stream into the outputs in one pass (no such
    file). merging: a LoRA adapter is merged into the intermediate, which is then held twice (base and merged).
    pull_back: after the push an empty Ollama in scratch downloads the tags' weights, one quantization at a
    time (only when it cannot take them from our Ollama as hard links). window: the bytes of weights streamed
    from the Hub that are on disk at once, in one pass (feed.window_bytes)."""
    types = (*quantizations, intermediate) if intermediate else quantizations
    size = {q: quantized_bytes(checkpoint_bytes, q) for q in types}
    checkpoint = checkpoint_bytes if downloaded else 0
    kept = sum(size[q] for q in quantizations)
    if intermediate is None:
        writing = [{"work": checkpoint + window, "outputs": kept}]  # every output written as the weights are read
    else:
        quantized = sum(size[q] for q in quantizations if q != intermediate)
        writing = [
            {"work": checkpoint + size[intermediate]},  # converting: the checkpoint and the intermediate GGUF
            *([{"work": 2 * size[intermediate]}] if merging else []),  # merging: base and merged intermediate
            {"work": size[intermediate], "outputs": quantized},  # quantizing: the intermediate and the results
        ]
    return [
        *writing,
        {"outputs": kept, "ollama": kept if ollama_copies else 0},  # creating: each GGUF and Ollama's blob
        *([{"outputs": kept, "ollama": kept if ollama_copies else 0,  # pulling back the largest
            "work": max(size[q] for q in quantizations)}] if pull_back else []),
    ]


def estimate_gguf(gguf_bytes: int, downloaded: bool, ollama_copies: bool, split_bytes: int = 0,
                  pulled_bytes: int = 0) -> list[dict[str, int]]:
    """The same for a repo's own GGUF files (exact sizes): downloaded to scratch, then moved to output-dir;
    split ones (split_bytes of them) are merged into output-dir while their parts are still there; the
    largest (pulled_bytes) is pulled back into scratch after the push."""
    created = {"outputs": gguf_bytes, "ollama": gguf_bytes if ollama_copies else 0}
    return [{"work": gguf_bytes if downloaded else 0},
            {"work": split_bytes if downloaded else 0, "outputs": gguf_bytes},
            created, *([{**created, "work": pulled_bytes}] if pulled_bytes else [])]


def same_filesystem(a: Path, b: Path) -> bool:
    return _filesystem(a) == _filesystem(b)


def _filesystem(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev


def check_disk(phases: list[dict[str, int]], folders: dict[str, Path]) -> None:
    """Raise if any filesystem has less free space than the largest phase puts on it."""
    by_fs: dict[int, list[str]] = {}
    for role, folder in folders.items():
        by_fs.setdefault(_filesystem(folder), []).append(role)
    for roles in by_fs.values():
        need = max(sum(phase.get(role, 0) for role in roles) for phase in phases)
        folder = folders[roles[0]]
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if need > free:
            names = {"work": "the work directory", "outputs": "output-dir", "ollama": "Ollama's models directory"}
            raise NotEnoughResources(
                f"Not enough disk: this run needs about {need / 1e9:.2f} GB on the filesystem of {folder} "
                f"({', '.join(names[r] for r in roles)}), which has {free / 1e9:.2f} GB free. Free space (on hosted "
                "runners, remove preinstalled SDKs such as /usr/share/dotnet and /usr/local/lib/android), request "
                "fewer quantizations, or set resource-check: false to try anyway.", resource="disk", needed=need,
                available=free)


# Loading a model for the smoke test and parity check holds its weights plus the KV cache and
# runtime buffers at Ollama's default context; 1 GB covers those for models up to ~10B parameters.
RUNTIME_BYTES = 10**9


# A tool that reads the checkpoint (the converter, llama-quantize, ...) holds its runtime (Python and torch:
# under 1 GB) and, one tensor at a time, a few copies of it: as stored, in f32, and the result.
TOOL_BASE_BYTES = 2 * 2**30
TOOL_BYTES_PER_ELEMENT = 12


def tool_memory(largest_tensor_elements: int) -> int:
    """The memory limit of the tools that read a checkpoint whose largest tensor has that many elements: what
    they need, and no more than the machine has (past the limit a tool is refused by name, never killed by
    the kernel for memory it never had)."""
    need = TOOL_BASE_BYTES + TOOL_BYTES_PER_ELEMENT * largest_tensor_elements
    available = available_memory(_read("/proc/meminfo", ""), _read("/sys/fs/cgroup/memory.max", "max"),
                                 _read("/sys/fs/cgroup/memory.current", "0"))
    return need if available is None else max(min(need, available), 2**30)


def available_memory(meminfo: str, cgroup_max: str = "max", cgroup_current: str = "0") -> int | None:
    """Bytes a new process can use: MemAvailable, capped by a cgroup (container) limit when one is set;
    None when neither is known (no /proc/meminfo, no limit)."""
    available = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                      if line.startswith("MemAvailable:")), None)
    if cgroup_max.strip() != "max":
        limit = int(cgroup_max) - int(cgroup_current)
        available = limit if available is None else min(available, limit)
    return available


def _read(path: str, default: str) -> str:
    try:
        with open(path, encoding="ascii") as file:
            return file.read()
    except OSError:
        return default


def check_memory(model_bytes: int, quantization: str) -> None:
    """Raise if the largest model (`model_bytes`, of type `quantization`) cannot be loaded for its checks
    (converting and quantizing stream tensors and need far less)."""
    need = model_bytes + RUNTIME_BYTES
    free = available_memory(_read("/proc/meminfo", ""), _read("/sys/fs/cgroup/memory.max", "max"),
                            _read("/sys/fs/cgroup/memory.current", "0"))
    if free is None:
        github.warning("memory not checked: this system tells neither the available memory nor a limit")
        return
    if need > free:
        raise NotEnoughResources(
            f"Not enough memory: checking the {quantization} model needs about {need / 1e9:.2f} GB of RAM, and "
            f"{free / 1e9:.2f} GB is available. Use a runner with more memory, drop {quantization} from "
            "quantizations, or set resource-check: false to try anyway.", resource="memory", needed=need,
            available=free)
