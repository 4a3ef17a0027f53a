"""Fetch the checkpoint: from the Hugging Face Hub (only the files conversion needs) or a local folder."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from . import github, quantize, retry
from .errors import PublishError

# What llama.cpp's converter and the Modelfile need: weights, config, tokenizer, chat template, license.
NEEDED_FILES = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "LICENSE*", "LICENCE*",
    "README.md", "modules.json",  # sentence-transformers: with 1_Pooling/config.json, an embedding model's pooling
    "preprocessor_config.json", "processor_config.json",  # a vision model's image size and normalization
)
# Pickle weights, only with allow-pickle and only under the names the converter reads (never, say,
# training_args.bin, which is a pickle too).
PICKLE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# A repo of ready GGUF files: the chosen ones, plus what the Modelfile takes from the repo.
GGUF_EXTRAS = ("LICENSE*", "LICENCE*", "README.md")
# A LoRA adapter (peft), with the tokenizer and chat template a fine-tune usually saves next to it. Not
# its README.md: the LoRA converter would take a base-model link out of it into the GGUF's metadata.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json", "LICENSE*", "LICENCE*")
REPO_KINDS = ("auto", "transformers", "gguf", "lora")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a repo is and which of its files the run needs."""

    kind: str  # "transformers": convert and quantize; "gguf": publish the repo's own GGUF files;
    # "lora": merge the adapter into its base checkpoint, then as transformers
    why: str  # one line for the log and the job summary
    files: tuple[str, ...]  # to download
    # gguf kind: quantization -> its file, or its split parts in order
    ggufs: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    commit: str  # resolved commit sha, or "" for a local folder
    plan: Plan
    adapter: Path | None = None  # a LoRA adapter to merge into this checkpoint (then `path` is its base)


def needed(files: list[str], patterns: tuple[str, ...] = NEEDED_FILES) -> list[str]:
    """The subset of a repo's files that match `patterns` (top-level and in subfolders)."""
    return [f for f in files if any(fnmatch.fnmatch(Path(f).name, pattern) for pattern in patterns)]


def plan(files: list[str], repo_kind: str, quantizations: tuple[str, ...], where: str,
         input_name: str = "hf-repo", allow_pickle: bool = False) -> Plan:
    """Decide from the repo's file names how to publish it (`repo_kind` 'auto'), or check the forced kind."""
    escaping = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if escaping:  # names come from the repository: never let one point outside the download folder
        raise PublishError(f"{where} has file names that leave the repository folder: {escaping[:3]}.",
                           input_name=input_name, title="Unsafe file names")
    names = {Path(f).name for f in files}
    if repo_kind == "lora" or (repo_kind == "auto" and "adapter_config.json" in files):
        if not {"adapter_config.json", "adapter_model.safetensors"} <= set(files):
            raise PublishError(f"{where} has no LoRA adapter (adapter_config.json and adapter_model.safetensors at its "
                               "top level; peft's save_pretrained writes them).", input_name=input_name,
                               title="No adapter")
        why = "forced by repo-kind: lora" if repo_kind == "lora" else "it has adapter_config.json"
        return Plan(kind="lora", why=f"merge the LoRA adapter into its base model, then convert and quantize ({why})",
                    files=tuple(f for f in needed(files, ADAPTER_FILES) if "/" not in f))
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    has_gguf = any(n.endswith(".gguf") for n in names)
    if repo_kind == "gguf" or (repo_kind == "auto" and has_gguf and not has_safetensors):
        if not has_gguf:
            raise PublishError(f"{where} has no *.gguf files, but repo-kind is gguf. Set repo-kind to auto.",
                               input_name="repo-kind")
        ggufs = pick_ggufs(files, quantizations, where)
        why = "forced by repo-kind: gguf" if repo_kind == "gguf" else "it has *.gguf files and no *.safetensors"
        return Plan(kind="gguf", why=f"publish the repo's GGUF files without conversion ({why})",
                    files=tuple(f for parts in ggufs.values() for f in parts) + tuple(needed(files, GGUF_EXTRAS)),
                    ggufs=ggufs)
    check_files(files, where, input_name, allow_pickle)
    if not has_safetensors:  # check_files let pickle weights through: allow-pickle is set
        return Plan(kind="transformers", why="convert the checkpoint's pickle weights with llama.cpp and quantize "
                    "(no *.safetensors; allow-pickle: true)", files=tuple(needed(files, NEEDED_FILES + PICKLE_WEIGHTS)))
    why = "forced by repo-kind: transformers" if repo_kind == "transformers" else "it has *.safetensors weights"
    return Plan(kind="transformers", why=f"convert the checkpoint with llama.cpp and quantize ({why})",
                files=tuple(needed(files)))


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text))


def _quant_in_name(name: str) -> str | None:
    """The llama-quantize type a GGUF file name carries, e.g. 'model-Q4_K_M.gguf' -> 'Q4_K_M'."""
    stem = Path(name).name.removesuffix(".gguf")
    by_upper = {t.upper(): t for t in quantize.QUANTIZATION_TYPES}
    # The longest match wins, so Q4_K_M is not read as Q4_K_S's prefix or Q4_0 as Q4_0_4_4.
    found = [by_upper[t] for t in by_upper if re.search(rf"(?<![A-Za-z0-9]){t}(?![A-Za-z0-9])", stem.upper())]
    return max(found, key=len) if found else None


_SPLIT_PART = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})\.gguf$")


def pick_ggufs(files: list[str], quantizations: tuple[str, ...], where: str) -> dict[str, tuple[str, ...]]:
    """The GGUF of each requested quantization: one file, or the complete, ordered parts of one split
    file (-00001-of-00003.gguf ...). Clear errors for missing, incomplete or ambiguous ones."""
    models = [f for f in files if f.endswith(".gguf") and "mmproj" not in Path(f).name.lower()]
    offered: dict[str, dict[str, list[str]]] = {}  # quantization -> one file or split set -> its files
    for name in models:
        quant = _quant_in_name(name)
        if quant:
            split = _SPLIT_PART.match(name)
            key = f"{split['stem']}-*-of-{split['total']}.gguf" if split else name
            offered.setdefault(quant, {}).setdefault(key, []).append(name)
    listing = ", ".join(f"{q} ({', '.join(sets)})" for q, sets in sorted(offered.items())) or "none"
    chosen = {}
    for quant in quantizations:
        candidates = offered.get(quant, {})
        if not candidates:
            raise PublishError(f"{where} has no GGUF file for {quant}. It offers: {listing}. Set quantizations to "
                               "some of these.", input_name="quantizations", title="Quantization not in the repo")
        if len(candidates) > 1:
            raise PublishError(f"{where} has several GGUF files for {quant}: {', '.join(candidates)}. Keep one per "
                               "quantization in the repo (or in the revision you publish).",
                               input_name="hf-repo", title="Ambiguous GGUF files")
        (key, parts), = candidates.items()
        parts = sorted(parts)
        split = _SPLIT_PART.match(parts[0])
        if split and [int(_SPLIT_PART.match(p)["part"]) for p in parts] != list(range(1, int(split["total"]) + 1)):
            raise PublishError(f"{where} has only {len(parts)} of the {int(split['total'])} parts of {key}.",
                               input_name="hf-repo", title="Incomplete split GGUF")
        chosen[quant] = tuple(parts)
    return chosen


def check_files(files: list[str], where: str, input_name: str = "hf-repo", allow_pickle: bool = False) -> None:
    """Refuse early a checkpoint the converter cannot use, naming what is missing."""
    names = {Path(f).name for f in files}
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(f for f in needed(files, PICKLE_WEIGHTS) if f.endswith(".bin"))
        if not pickles:
            raise PublishError(f"{where} has no *.safetensors weights.", input_name=input_name,
                               title="No usable weights")
        if not allow_pickle:
            raise PublishError(
                f"{where} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded. "
                "Re-save them as safetensors (model.save_pretrained(dir, safe_serialization=True)), or set "
                "allow-pickle: true if you trust the repo.", input_name=input_name, title="Pickle weights refused")
    if "config.json" not in names:
        raise PublishError(f"{where} has no config.json, so it is not a transformers checkpoint.",
                           input_name=input_name, title="Not a checkpoint")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"}:
        raise PublishError(f"{where} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json or vocab.txt). "
                           "Save the tokenizer with the model (tokenizer.save_pretrained).",
                           input_name=input_name, title="No tokenizer")


@dataclasses.dataclass(frozen=True)
class RemoteCheckpoint:
    repo: str
    commit: str
    plan: Plan
    sizes: dict[str, int]  # the files to download and their sizes in bytes


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo: str, revision: str, token: str, repo_input: str = "hf-repo",
                revision_input: str = "hf-revision") -> Iterator[None]:
    """Turn the Hub client's errors into messages that name the input to fix."""
    endpoint = api.endpoint
    try:
        yield
    except GatedRepoError as exc:
        raise PublishError(f"{repo} is gated: accept its terms on the Hub with the account whose token is in "
                           "hf-token.", input_name="hf-token") from exc
    except RepositoryNotFoundError as exc:
        # Some Hub servers answer an unknown revision as an unknown repo: tell the two apart.
        if _exists(api, repo):
            raise PublishError(f"{repo} has no branch, tag or commit '{revision}'.",
                               input_name=revision_input) from exc
        why = "hf-token has no access to it" if token else "it is private and hf-token is not set"
        raise PublishError(f"The model repo '{repo}' was not found on {endpoint}: check the name, or {why}.",
                           input_name=repo_input) from exc
    except RevisionNotFoundError as exc:
        raise PublishError(f"{repo} has no branch, tag or commit '{revision}'.", input_name=revision_input) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise PublishError(f"The Hub answered {status} for {repo}@{revision}: {exc}",
                           input_name="hf-token" if status in (401, 403) else repo_input) from exc
    except (requests.RequestException, LocalEntryNotFoundError, OSError) as exc:
        raise PublishError(f"Could not download {repo} from {endpoint}: {exc}. Check that the Hub is reachable "
                           "(HF_ENDPOINT) and re-run.", title="Hub unreachable") from exc


def _api(token: str) -> HfApi:
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT", "https://huggingface.co"), token=token or False)


def _retry_if_unreachable(exc: PublishError) -> bool:
    return exc.title == "Hub unreachable"


def inspect(repo: str, revision: str, token: str, repo_kind: str, quantizations: tuple[str, ...],
            allow_pickle: bool, inputs: tuple[str, str] = ("hf-repo", "hf-revision")) -> RemoteCheckpoint:
    """Resolve `revision` to a commit, decide how to publish the repo, and size the files to download.
    `inputs` name the inputs that gave the repo and the revision, for error messages."""
    api = _api(token)

    def query():
        with _hub_errors(api, repo, revision, token, *inputs):
            info = api.model_info(repo, revision=revision, timeout=TIMEOUT_S)
            files = [s.rfilename for s in info.siblings or []]
            repo_plan = plan(files, repo_kind, quantizations, f"{repo}@{revision}", input_name=inputs[0],
                             allow_pickle=allow_pickle)
            tree = api.list_repo_tree(repo, revision=info.sha, recursive=True)
            return info, files, repo_plan, {entry.path: entry.size or 0 for entry in tree
                                            if entry.path in repo_plan.files and hasattr(entry, "size")}

    info, files, repo_plan, sizes = retry.retrying(query, f"querying {repo}", retry_if=_retry_if_unreachable)
    github.log(f"{repo}@{revision} is commit {info.sha}: {len(sizes)} of {len(files)} files to download, "
               f"{sum(sizes.values()) / 1e9:.2f} GB")
    return RemoteCheckpoint(repo=repo, commit=info.sha or "", plan=repo_plan, sizes=sizes)


def download(remote: RemoteCheckpoint, token: str, destination: Path) -> Checkpoint:
    """Download only the needed files of the resolved commit."""
    api = _api(token)

    def fetch() -> None:  # a repeated call resumes: finished files are kept, partial ones continued
        with _hub_errors(api, remote.repo, remote.commit, token):
            snapshot_download(remote.repo, revision=remote.commit, token=token or False,
                              allow_patterns=list(remote.sizes), local_dir=destination, endpoint=api.endpoint,
                              etag_timeout=TIMEOUT_S)

    retry.retrying(fetch, f"downloading {remote.repo}", retry_if=_retry_if_unreachable)
    return Checkpoint(path=destination, commit=remote.commit, plan=remote.plan)


def read_config(remote: RemoteCheckpoint, token: str, destination: Path, name: str = "config.json") -> dict[str, Any]:
    """Download one JSON file alone (into the folder the full download then completes) and parse it."""
    api = _api(token)

    def fetch() -> Path:
        with _hub_errors(api, remote.repo, remote.commit, token):
            return Path(hf_hub_download(remote.repo, name, revision=remote.commit, token=token or False,
                                        local_dir=destination, endpoint=api.endpoint, etag_timeout=TIMEOUT_S))

    return read_json(retry.retrying(fetch, f"downloading {remote.repo}'s {name}", retry_if=_retry_if_unreachable))


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PublishError(f"{path.name} in the checkpoint is not valid JSON: {exc}", title="Bad checkpoint") from exc


def _exists(api: HfApi, repo: str) -> bool:
    try:
        api.model_info(repo, revision="main", timeout=TIMEOUT_S)
        return True
    except (HfHubHTTPError, requests.RequestException):
        return False


def local(path: Path, repo_kind: str, quantizations: tuple[str, ...],
          allow_pickle: bool) -> tuple[Checkpoint, dict[str, int]]:
    """A local checkpoint folder, and the sizes of the files the run reads."""
    files = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    folder_plan = plan(files, repo_kind, quantizations, str(path), input_name="model-path",
                       allow_pickle=allow_pickle)
    return Checkpoint(path=path, commit="", plan=folder_plan), {f: (path / f).stat().st_size for f in folder_plan.files}
