"""Fetch the checkpoint: from the Hugging Face Hub (only the files conversion needs) or a local folder."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from . import github, quantize, registry, retry
from .errors import DiskFull, HubError, InputError, LocalWriteFailed, RepoRefused

# What llama.cpp's converter and the Modelfile read: weights, config, tokenizer, chat template, license.
# Paths from the repository's top: the converter reads the top-level model*.safetensors (not, say, a
# Mistral repo's consolidated.safetensors or a checkpoint-500/ folder's), and so does the download.
NEEDED_FILES = (
    "model*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "LICENSE*", "LICENCE*",
    "README.md",
    # sentence-transformers: an embedding model's pooling, and the longest input it embeds
    "modules.json", "*_Pooling/config.json", "sentence_bert_config.json",
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
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")  # downloaded after the checks that read the rest
# A description file (config, tokenizer, template, license) is kilobytes to a few megabytes (a tokenizer.json
# with a large vocabulary: ~30 MB); more is not a description, and is refused before it is parsed.
DESCRIPTION_MAX_BYTES = 100_000_000
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
    # Set when the weights files hold their headers only: their bytes stream from this remote while they
    # are converted (feed.py).
    streamed_from: RemoteCheckpoint | None = None


def needed(files: list[str], patterns: tuple[str, ...] = NEEDED_FILES) -> list[str]:
    """The subset of a repo's files that match `patterns`: paths from the repo's top, folder by folder
    (`*` never crosses a `/`)."""
    return [f for f in files if any(fnmatch.fnmatchcase(f, pattern) and f.count("/") == pattern.count("/")
                                    for pattern in patterns)]


def refuse_unsafe_names(files: list[str], where: str, input_name: str = "hf-repo") -> None:
    """Names come from the repository's server: never let one point outside the download folder."""
    escaping = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if escaping:
        raise RepoRefused(f"{where} has file names that leave the repository folder: {escaping[:3]}.",
                          input_name=input_name, title="Unsafe file names")


def plan(files: list[str], repo_kind: str, quantizations: tuple[str, ...], where: str,
         input_name: str = "hf-repo", allow_pickle: bool = False) -> Plan:
    """Decide from the repo's file names how to publish it (`repo_kind` 'auto'), or check the forced kind."""
    refuse_unsafe_names(files, where, input_name)
    names = {Path(f).name for f in files}
    if repo_kind == "lora" or (repo_kind == "auto" and "adapter_config.json" in files):
        if not {"adapter_config.json", "adapter_model.safetensors"} <= set(files):
            raise RepoRefused(f"{where} has no LoRA adapter (adapter_config.json and adapter_model.safetensors at its "
                              "top level; peft's save_pretrained writes them).", input_name=input_name,
                              title="No adapter")
        why = "forced by repo-kind: lora" if repo_kind == "lora" else "it has adapter_config.json"
        return Plan(kind="lora", why=f"merge the LoRA adapter into its base model, then convert and quantize ({why})",
                    files=tuple(f for f in needed(files, ADAPTER_FILES) if "/" not in f))
    has_safetensors = bool(needed(files, ("model*.safetensors",)))
    has_gguf = any(n.endswith(".gguf") for n in names)
    if repo_kind == "gguf" or (repo_kind == "auto" and has_gguf and not has_safetensors):
        if not has_gguf:
            raise InputError(f"{where} has no *.gguf files, but repo-kind is gguf. Set repo-kind to auto.",
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
            raise InputError(f"{where} has no GGUF file for {quant}. It offers: {listing}. Set quantizations to "
                             "some of these.", input_name="quantizations")
        if len(candidates) > 1:
            raise RepoRefused(f"{where} has several GGUF files for {quant}: {', '.join(candidates)}. Keep one per "
                              "quantization in the repo (or in the revision you publish).",
                              input_name="hf-repo", title="Ambiguous GGUF files")
        (key, parts), = candidates.items()
        parts = sorted(parts)
        split = _SPLIT_PART.match(parts[0])
        numbers = [int(m["part"]) for m in map(_SPLIT_PART.match, parts) if m]
        if split and numbers != list(range(1, int(split["total"]) + 1)):
            raise RepoRefused(f"{where} has only {len(parts)} of the {int(split['total'])} parts of {key}.",
                              input_name="hf-repo", title="Incomplete split GGUF")
        chosen[quant] = tuple(parts)
    return chosen


def check_files(files: list[str], where: str, input_name: str = "hf-repo", allow_pickle: bool = False) -> None:
    """Refuse early a checkpoint the converter cannot use, naming what is missing."""
    names = set(files) - {f for f in files if "/" in f}  # the converter reads the top level
    if not needed(files, ("model*.safetensors",)):
        pickles = sorted(f for f in needed(files, PICKLE_WEIGHTS) if f.endswith(".bin"))
        if not pickles:
            raise RepoRefused(f"{where} has no model*.safetensors weights at its top level (what llama.cpp's "
                              "converter reads).", input_name=input_name, title="No usable weights")
        if not allow_pickle:
            raise RepoRefused(
                f"{where} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded. "
                "Re-save them as safetensors (model.save_pretrained(dir, safe_serialization=True)), or set "
                "allow-pickle: true if you trust the repo.", input_name=input_name, title="Pickle weights refused")
    if "config.json" not in names:
        raise RepoRefused(f"{where} has no config.json, so it is not a transformers checkpoint.",
                          input_name=input_name, title="Not a checkpoint")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"}:
        raise RepoRefused(f"{where} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json or vocab.txt). "
                          "Save the tokenizer with the model (tokenizer.save_pretrained).",
                          input_name=input_name, title="No tokenizer")


@dataclasses.dataclass(frozen=True)
class RemoteCheckpoint:
    repo: str
    commit: str
    plan: Plan
    sizes: dict[str, int]  # the files to download and their sizes in bytes

    def descriptions(self) -> list[str]:
        """The files to download that are not weights: what the checks before any weights read."""
        return sorted(name for name in self.sizes if not name.endswith(WEIGHT_SUFFIXES))

    def weights(self) -> list[str]:
        return sorted(name for name in self.sizes if name.endswith(WEIGHT_SUFFIXES))


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo: str, revision: str, token: str, repo_input: str = "hf-repo",
                revision_input: str = "hf-revision", destination: Path | None = None) -> Iterator[None]:
    """Turn the Hub client's errors into typed ones that name the input to fix; a full disk (while
    downloading into `destination`) says so and is not retried."""
    endpoint = api.endpoint
    try:
        yield
    except GatedRepoError as exc:
        raise InputError(f"{repo} is gated: accept its terms on the Hub with the account whose token is in "
                         "hf-token.", input_name="hf-token") from exc
    except RepositoryNotFoundError as exc:
        # Some Hub servers answer an unknown revision as an unknown repo: tell the two apart.
        if _exists(api, repo):
            raise InputError(f"{repo} has no branch, tag or commit '{revision}'.",
                             input_name=revision_input) from exc
        why = "hf-token has no access to it" if token else "it is private and hf-token is not set"
        raise InputError(f"The model repo '{repo}' was not found on {endpoint}: check the name, or {why}.",
                         input_name=repo_input) from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"{repo} has no branch, tag or commit '{revision}'.", input_name=revision_input) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise HubError(f"The Hub answered {status} for {repo}@{revision}: {exc}", status=status,
                       retriable=status is None or registry.retriable_status(status),
                       input_name="hf-token" if status in (401, 403) else repo_input) from exc
    except OSError as exc:  # requests' errors and the Hub client's missing entries are OSErrors too
        if isinstance(exc, (requests.RequestException, LocalEntryNotFoundError)) or exc.errno is None:
            raise HubError(f"Could not download {repo} from {endpoint}: {exc}. Check that the Hub is reachable "
                           "(HF_ENDPOINT) and re-run.", status=None, retriable=True, title="Hub unreachable") from exc
        where = destination or Path.cwd()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(where, free=shutil.disk_usage(_existing(where)).free, what=f"downloading {repo}") from exc
        raise LocalWriteFailed(f"Could not write {repo}'s files into {where}: {exc}. Point output-dir at a "
                               "writable folder in the workspace.", path=where,
                               title="Download failed") from exc


def _existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (to measure the filesystem it would be on)."""
    return next(p for p in (path, *path.parents) if p.exists())


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _api(token: str) -> HfApi:
    return HfApi(endpoint=endpoint(), token=token or False)


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
            tree = list(api.list_repo_tree(repo, revision=info.sha, recursive=True))
            # Only sizes are read from this second listing; a server that names other files here is hostile.
            refuse_unsafe_names([entry.path for entry in tree], f"{repo}@{revision}", inputs[0])
            return info, files, repo_plan, {entry.path: entry.size or 0 for entry in tree
                                            if entry.path in repo_plan.files and hasattr(entry, "size")}

    info, files, repo_plan, sizes = retry.retrying(query, f"querying {repo}")
    github.log(f"{repo}@{revision} is commit {info.sha}: {len(sizes)} of {len(files)} files to download, "
               f"{sum(sizes.values()) / 1e9:.2f} GB")
    return RemoteCheckpoint(repo=repo, commit=info.sha or "", plan=repo_plan, sizes=sizes)


def download(remote: RemoteCheckpoint, token: str, destination: Path, names: list[str]) -> Checkpoint:
    """Download `names` (remote.descriptions() or remote.weights()) of the resolved commit, each by its exact
    name as checked by plan() (never a pattern: the server's own listing may say something else by now)."""
    for name in names:
        github.log(f"downloading {name} ({remote.sizes[name] / 1e6:,.1f} MB)")
        _fetch(remote, token, destination, name)
    return Checkpoint(path=destination, commit=remote.commit, plan=remote.plan)


def _fetch(remote: RemoteCheckpoint, token: str, destination: Path, name: str) -> Path:
    """One file into destination/name (a repeated call resumes a partial file), refused unless it is a
    regular file there, whatever the server answered."""
    api = _api(token)
    disable_progress_bars()  # the log gets a line per file (download), not a bar redrawn on stderr

    def fetch() -> Path:
        with _hub_errors(api, remote.repo, remote.commit, token, destination=destination):
            return Path(hf_hub_download(remote.repo, name, revision=remote.commit, token=token or False,
                                        local_dir=destination, endpoint=api.endpoint, etag_timeout=TIMEOUT_S))

    path = retry.retrying(fetch, f"downloading {remote.repo}'s {name}")
    expected = destination / name
    if path.absolute() != expected.absolute() or expected.is_symlink() or not expected.is_file() or \
            not expected.resolve().is_relative_to(destination.resolve()):
        raise RepoRefused(f"{remote.repo}'s {name} did not arrive as a file in the download folder (it came as "
                          f"{path}): refused.", title="Unsafe download")
    return expected


def read_text(path: Path, errors: str = "strict") -> str:
    """A checkpoint's text file (a chat template, a license): a regular file of at most DESCRIPTION_MAX_BYTES
    of UTF-8 (`errors` as str.decode takes it), or a refusal naming it."""
    if path.is_symlink() or not path.is_file():
        raise RepoRefused(f"{path.name} in the checkpoint is not a regular file (a link, say): refused.",
                          title="Bad checkpoint")
    size = path.stat().st_size
    if size > DESCRIPTION_MAX_BYTES:
        raise RepoRefused(f"{path.name} in the checkpoint is {size / 1e6:,.0f} MB, more than any "
                          f"configuration or template holds ({DESCRIPTION_MAX_BYTES / 1e6:,.0f} MB): refused.",
                          title="Bad checkpoint")
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except (OSError, ValueError) as exc:
        raise RepoRefused(f"{path.name} in the checkpoint is not UTF-8 text: {exc}", title="Bad checkpoint") from exc


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file, which must hold an object."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RepoRefused(f"{path.name} in the checkpoint is not valid JSON: {exc}", title="Bad checkpoint") from exc
    if not isinstance(value, dict):
        raise RepoRefused(f"{path.name} in the checkpoint is not a JSON object.", title="Bad checkpoint")
    return value


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Reading a checkpoint's file `name` whose values have other types or shapes than its format has (a
    token that is a number, a list where an object belongs): a refusal naming the file, never a crash."""
    try:
        yield
    except (TypeError, ValueError, LookupError, AttributeError, RecursionError) as exc:
        raise RepoRefused(f"{name} in the checkpoint is malformed ({type(exc).__name__}: {exc}).",
                          title="Bad checkpoint") from exc


def _exists(api: HfApi, repo: str) -> bool:
    try:
        api.model_info(repo, revision="main", timeout=TIMEOUT_S)
        return True
    except (HfHubHTTPError, requests.RequestException):
        return False


def local(path: Path, repo_kind: str, quantizations: tuple[str, ...],
          allow_pickle: bool) -> tuple[Checkpoint, dict[str, int]]:
    """A local checkpoint folder, and the sizes of the files the run reads. A link that leads out of the
    folder is refused: a repository cloned with git brings its links along, and one named LICENSE that
    leads to /proc/self/environ would publish the runner's secrets as the model's license."""
    root = path.resolve()
    leaving = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_symlink()
               and not p.resolve().is_relative_to(root)]
    if leaving:
        raise RepoRefused(f"{path} has links that lead out of it: {', '.join(sorted(leaving)[:3])}. Copy the files "
                          "themselves into the folder (cp -rL), or publish from the Hub with hf-repo.",
                          input_name="model-path", title="Unsafe file names")
    files = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    folder_plan = plan(files, repo_kind, quantizations, str(path), input_name="model-path",
                       allow_pickle=allow_pickle)
    return Checkpoint(path=path, commit="", plan=folder_plan), {f: (path / f).stat().st_size for f in folder_plan.files}
