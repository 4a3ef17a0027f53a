"""Fetch the checkpoint: from the Hugging Face Hub (only the files conversion needs) or a local folder."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
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

from . import github, retry
from .errors import PublishError

# What llama.cpp's converter and the Modelfile need: weights, config, tokenizer, chat template, license.
NEEDED_FILES = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "LICENSE*", "LICENCE*", "README.md",
)
TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    commit: str  # resolved commit sha, or "" for a local folder
    files: tuple[str, ...]


def needed(files: list[str]) -> list[str]:
    """The subset of a repo's files that will be downloaded (top-level and in subfolders)."""
    return [f for f in files if any(fnmatch.fnmatch(Path(f).name, pattern) for pattern in NEEDED_FILES)]


def check_files(files: list[str], where: str, input_name: str = "hf-repo") -> None:
    """Refuse early a repo the converter cannot use, naming what is missing."""
    escaping = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
    if escaping:  # names come from the repository: never let one point outside the download folder
        raise PublishError(f"{where} has file names that leave the repository folder: {escaping[:3]}.",
                           input_name=input_name, title="Unsafe file names")
    names = {Path(f).name for f in files}
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
        hint = (f" It has only pickle weights ({', '.join(pickles[:3])}); re-save them as safetensors "
                "(model.save_pretrained(dir, safe_serialization=True)).") if pickles else ""
        raise PublishError(f"{where} has no *.safetensors weights.{hint}", input_name=input_name,
                           title="No usable weights")
    if "config.json" not in names:
        raise PublishError(f"{where} has no config.json, so it is not a transformers checkpoint.",
                           input_name=input_name, title="Not a checkpoint")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        raise PublishError(f"{where} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json). "
                           "Save the tokenizer with the model (tokenizer.save_pretrained).",
                           input_name=input_name, title="No tokenizer")


@dataclasses.dataclass(frozen=True)
class RemoteCheckpoint:
    repo: str
    commit: str
    sizes: dict[str, int]  # the files to download and their sizes in bytes


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo: str, revision: str, token: str) -> Iterator[None]:
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
                               input_name="hf-revision") from exc
        why = "hf-token has no access to it" if token else "it is private and hf-token is not set"
        raise PublishError(f"The model repo '{repo}' was not found on {endpoint}: check the name, or {why}.",
                           input_name="hf-repo") from exc
    except RevisionNotFoundError as exc:
        raise PublishError(f"{repo} has no branch, tag or commit '{revision}'.", input_name="hf-revision") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise PublishError(f"The Hub answered {status} for {repo}@{revision}: {exc}",
                           input_name="hf-token" if status in (401, 403) else "hf-repo") from exc
    except (requests.RequestException, LocalEntryNotFoundError, OSError) as exc:
        raise PublishError(f"Could not download {repo} from {endpoint}: {exc}. Check that the Hub is reachable "
                           "(HF_ENDPOINT) and re-run.", title="Hub unreachable") from exc


def _api(token: str) -> HfApi:
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT", "https://huggingface.co"), token=token or False)


def _retry_if_unreachable(exc: PublishError) -> bool:
    return exc.title == "Hub unreachable"


def inspect(repo: str, revision: str, token: str) -> RemoteCheckpoint:
    """Resolve `revision` to a commit, check the repo is convertible, and size the files to download."""
    api = _api(token)

    def query():
        with _hub_errors(api, repo, revision, token):
            info = api.model_info(repo, revision=revision, timeout=TIMEOUT_S)
            files = [s.rfilename for s in info.siblings or []]
            check_files(files, f"{repo}@{revision}")
            wanted = set(needed(files))
            tree = api.list_repo_tree(repo, revision=info.sha, recursive=True)
            return info, files, {entry.path: entry.size or 0 for entry in tree
                                 if entry.path in wanted and hasattr(entry, "size")}

    info, files, sizes = retry.retrying(query, f"querying {repo}", retry_if=_retry_if_unreachable)
    github.log(f"{repo}@{revision} is commit {info.sha}: {len(sizes)} of {len(files)} files to download, "
               f"{sum(sizes.values()) / 1e9:.2f} GB")
    return RemoteCheckpoint(repo=repo, commit=info.sha or "", sizes=sizes)


def download(remote: RemoteCheckpoint, token: str, destination: Path) -> Checkpoint:
    """Download only the needed files of the resolved commit."""
    api = _api(token)

    def fetch() -> None:  # a repeated call resumes: finished files are kept, partial ones continued
        with _hub_errors(api, remote.repo, remote.commit, token):
            snapshot_download(remote.repo, revision=remote.commit, token=token or False,
                              allow_patterns=list(remote.sizes), local_dir=destination, endpoint=api.endpoint,
                              etag_timeout=TIMEOUT_S)

    retry.retrying(fetch, f"downloading {remote.repo}", retry_if=_retry_if_unreachable)
    return Checkpoint(path=destination, commit=remote.commit, files=tuple(remote.sizes))


def read_config(remote: RemoteCheckpoint, token: str, destination: Path) -> dict[str, Any]:
    """Download config.json alone (into the folder the full download then completes) and parse it."""
    api = _api(token)

    def fetch() -> Path:
        with _hub_errors(api, remote.repo, remote.commit, token):
            return Path(hf_hub_download(remote.repo, "config.json", revision=remote.commit, token=token or False,
                                        local_dir=destination, endpoint=api.endpoint, etag_timeout=TIMEOUT_S))

    return read_json(retry.retrying(fetch, f"downloading {remote.repo}'s config.json", retry_if=_retry_if_unreachable))


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


def local(path: Path) -> tuple[Checkpoint, int]:
    """A local checkpoint folder, and the size of its needed files."""
    files = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    check_files(files, str(path), input_name="model-path")
    kept = needed(files)
    return Checkpoint(path=path, commit="", files=tuple(kept)), sum((path / f).stat().st_size for f in kept)
