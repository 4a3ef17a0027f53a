"""Fetch the checkpoint: from the Hugging Face Hub (only the files conversion needs) or a local folder."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path

import requests
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from . import github
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


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def needed(files: list[str]) -> list[str]:
    """The subset of a repo's files that will be downloaded (top-level and in subfolders)."""
    return [f for f in files if any(fnmatch.fnmatch(Path(f).name, pattern) for pattern in NEEDED_FILES)]


def check_files(files: list[str], where: str, input_name: str = "hf-repo") -> None:
    """Refuse early a repo the converter cannot use, naming what is missing."""
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


def download(repo: str, revision: str, token: str, destination: Path) -> Checkpoint:
    """Resolve `revision`, check the repo is convertible, then download only the needed files."""
    endpoint = _endpoint()
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo, revision=revision, timeout=TIMEOUT_S)
        files = [s.rfilename for s in info.siblings or []]
        check_files(files, f"{repo}@{revision}")
        wanted = needed(files)
        github.log(f"{repo}@{revision} is commit {info.sha}; downloading {len(wanted)} of {len(files)} files")
        snapshot_download(repo, revision=info.sha, token=token or False, allow_patterns=wanted,
                          local_dir=destination, endpoint=endpoint, etag_timeout=TIMEOUT_S)
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
    return Checkpoint(path=destination, commit=info.sha or "", files=tuple(wanted))


def _exists(api: HfApi, repo: str) -> bool:
    try:
        api.model_info(repo, revision="main", timeout=TIMEOUT_S)
        return True
    except (HfHubHTTPError, requests.RequestException):
        return False


def local(path: Path) -> Checkpoint:
    files = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
    check_files(files, str(path), input_name="model-path")
    return Checkpoint(path=path, commit="", files=tuple(needed(files)))
