"""Stages 6 and 7: push every tag, verify what the registry holds, and pull it back with an empty Ollama.

Before any push every tag is looked up: a tag that already holds exactly these layers is skipped (a re-run
is a no-op), a version tag holding other content is refused unless overwrite is set. After each push the
manifest is read back; then a second Ollama with nothing of its own pulls every tag, as a user's would."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import checks, github, registry, retry
from .errors import AlreadyPublished, PullCheckFailed, PushNotVerified, RegistryError
from .ollama import OllamaClient, free_loopback_address, serve, signing_key
from .settings import Settings

# Something else changed the tag between Ollama's push and the check, or the registry stores manifests
# differently from what Ollama sent.
UNVERIFIED_FIX = ("Make sure nothing else pushes to this model while the release runs, then re-run; if it "
                  "happens again, the registry rewrites manifests and users would not get what was checked.")
# The layers that hold weights: the pull-back takes them from our Ollama rather than downloading them again.
WEIGHT_MEDIA_TYPES = ("application/vnd.ollama.image.model", "application/vnd.ollama.image.projector")


@dataclasses.dataclass
class TagResult:
    tag: str
    name: str  # the full name Ollama's API uses
    quantization: str
    gguf: Path
    digest: str = ""  # the local model digest, as `ollama list` shows it
    size: int = 0
    registry_digest: str = ""  # the manifest digest in the registry, once pushed
    layers: tuple[str, ...] = ()  # the config and layer digests the registry holds for the tag, once pushed
    weights: tuple[tuple[str, int], ...] = ()  # of those, the weights' layers (model, projector): digest, size
    answer: str = ""
    pushed: bool = False
    pulled: bool = False  # an empty Ollama pulled the tag back, with the same layers (and answered)


@contextlib.contextmanager
def push_key(settings: Settings, server_home: Path) -> Iterator[None]:
    """The push key where our Ollama server reads it at each signature, for the block only: nothing that
    reads the repository (the converter, the tools) ever runs while it is on disk."""
    if settings.ollama_host or not settings.ollama_key:  # a server of the user's signs with its own key
        yield
        return
    with signing_key(server_home, settings.ollama_key):
        yield


def _layers(manifest: dict[str, Any]) -> list[str]:
    return sorted(layer["digest"] for layer in manifest.get("layers", []))


def _blobs(manifest: dict[str, Any]) -> tuple[str, ...]:
    """Every blob a manifest names: its config, then its layers."""
    return (manifest.get("config", {}).get("digest", ""), *_layers(manifest))


def _remember(result: TagResult, digest: str, manifest: dict[str, Any]) -> None:
    """What the registry holds for the tag, as the pull-back checks it."""
    result.registry_digest, result.layers = digest, _blobs(manifest)
    result.weights = tuple((layer["digest"], int(layer.get("size", 0))) for layer in manifest.get("layers", [])
                           if layer.get("mediaType") in WEIGHT_MEDIA_TYPES)


def _already_published(client: OllamaClient, settings: Settings, results: list[TagResult]) -> set[str]:
    """Check every tag in the registry before pushing any. Returns the tags that already hold exactly
    these layers (a re-run skips them). A version tag holding other content is refused: published
    versions are immutable unless overwrite is set; tags without the version (latest, ...) move."""
    name = settings.model_name
    identical = set()
    for result in results:
        found = _manifest(settings, result.tag)
        if found is None:
            continue
        local = client.local_manifest(name.host, name.namespace, name.model, result.tag)
        if local is not None and _layers(json.loads(local)) == _layers(found[1]):
            identical.add(result.tag)
            _remember(result, *found)
            github.log(f"{result.name} is already published with the same layers; not pushing it again")
        elif result.tag in settings.immutable_tags and not settings.overwrite:
            raise AlreadyPublished(f"{result.name} is already published with different content, and published "
                                   "versions are immutable. Release a new version, or set overwrite: true to replace "
                                   "it.")
    return identical


def _manifest(settings: Settings, tag: str) -> tuple[str, dict] | None:
    """The tag's manifest as the push key's owner sees it (a private model's too)."""
    name = settings.model_name
    return retry.retrying(lambda: registry.fetch_manifest(name, tag, insecure=settings.insecure_registry,
                                                          key=settings.ollama_key),
                          f"reading {name.with_tag(tag)} in the registry")


def _progress_logger() -> Callable[[dict[str, Any]], None]:
    """Logs a push's or pull's status lines once each, and each blob's transfer as github.Progress does."""
    statuses: set[str] = set()
    blobs: dict[str, github.Progress] = {}

    def progress(line: dict[str, Any]) -> None:
        status, total = line.get("status", ""), line.get("total") or 0
        if not total:
            if status not in statuses:
                statuses.add(status)
                github.log(f"  {status}")
            return
        if status not in blobs:
            blobs[status] = github.Progress(f"  {status}", total)
        blobs[status].update(line.get("completed") or 0)

    return progress


def push(client: OllamaClient, settings: Settings, results: list[TagResult]) -> None:
    skip = _already_published(client, settings, results)
    for result in results:
        if result.tag in skip:
            result.pushed = True
            continue
        github.log(f"pushing {result.name}")
        log_start = client.log_size()
        # A re-push resumes: blobs the registry already has are skipped. Refusals are not retried, nor is
        # Ollama gone (OllamaUnreachable is never retriable).
        retry.retrying(functools.partial(client.push, result.name, settings.insecure_registry, _progress_logger()),
                       f"pushing {result.name}")
        for resent in client.resent_parts(log_start):  # Ollama's own retries, one part each, the rest kept
            github.log(f"  Ollama sent a part again (the parts that arrived are kept): {resent}")
        _verify_pushed(client, settings, result)
        result.pushed = True


def _verify_pushed(client: OllamaClient, settings: Settings, result: TagResult) -> None:
    """Read the manifest back from the registry. With our own server's manifest file at hand, the registry
    must hold exactly that manifest (Ollama pushes the file without its final newline): the config and
    layers built and checked here. Without it (ollama-host), the manifest must at least have a model layer.
    """
    name = settings.model_name
    found = _manifest(settings, result.tag)
    if found is None:
        raise PushNotVerified(f"After pushing {result.name} the registry has no such tag. {UNVERIFIED_FIX}")
    _remember(result, *found)
    remote = found[1]
    remote_layers = _layers(remote)
    local = client.local_manifest(name.host, name.namespace, name.model, result.tag)
    if local is not None:
        expected = "sha256:" + hashlib.sha256(local.removesuffix(b"\n")).hexdigest()
        if result.registry_digest != expected:
            raise PushNotVerified(f"After pushing {result.name} the registry holds manifest "
                                  f"{result.registry_digest}, not {expected}, the one Ollama built (layers there: "
                                  f"{remote_layers}). {UNVERIFIED_FIX}")
    elif not any(layer.get("mediaType") == "application/vnd.ollama.image.model" for layer in remote.get("layers", [])):
        raise PushNotVerified(f"The registry's manifest for {result.name} has no model layer. {UNVERIFIED_FIX}")
    github.log(f"  verified in the registry: manifest {result.registry_digest}, {len(remote_layers)} layers")


def pull_back(settings: Settings, scratch: Path, results: list[TagResult], ours: OllamaClient,
              smoke: Callable[[OllamaClient, str], str]) -> None:
    """The proof a user's `ollama pull` works: a second Ollama with nothing of its own (models, blobs, HOME)
    pulls every pushed tag, must hold exactly the blobs the registry verified, and answers the smoke test
    once per quantization. It downloads the manifests, configs and small layers (template, parameters,
    license: what makes the weights a working model); the weights it takes from our Ollama when the registry
    proves it holds them (_take_weights). One quantization at a time, deleted once checked."""
    root = scratch / "pull-back"
    name = settings.model_name
    try:
        with serve(root / "ollama.log", root / "models", root / "home", settings.ollama_key,
                   bind=free_loopback_address()) as empty:
            by_quantization: dict[str, list[TagResult]] = {}
            for result in results:
                by_quantization.setdefault(result.quantization, []).append(result)
            for tagged in by_quantization.values():
                taken = _take_weights(settings, ours, empty, tagged[0])
                for result in tagged:
                    retry.retrying(functools.partial(empty.pull, result.name, settings.insecure_registry,
                                                     _progress_logger()), f"pulling {result.name}")
                    pulled = empty.local_manifest(name.host, name.namespace, name.model, result.tag)
                    blobs = _blobs(json.loads(pulled)) if pulled is not None else ()
                    if blobs != result.layers:
                        raise PullCheckFailed(f"An empty Ollama pulled {result.name} with blobs {list(blobs)}, not "
                                              f"{list(result.layers)}, the ones pushed.")
                account = "pulled" if settings.smoke_test == "off" else checks.warn_instead(
                    settings.smoke_test, functools.partial(smoke, empty, tagged[0].name))
                empty.unload(tagged[0].name)  # one model in memory at a time
                github.log(f"{tagged[0].quantization}: pulled by an empty Ollama, same blobs; {account}")
                if taken:
                    github.log(f"  its weights ({taken / 1e9:.2f} GB) were not downloaded again: the registry holds "
                               "them under the same digests and sizes, and it takes a blob only once its bytes "
                               "hash to the digest; the empty Ollama got them as hard links to this run's")
                for result in tagged:
                    empty.delete(result.name)
                    result.pulled = True
    except (RegistryError, PullCheckFailed) as exc:
        message = (f"Pushed, but an empty Ollama could not use what it pulled from {name.host}: {exc.message}"
                   if isinstance(exc, PullCheckFailed) else
                   f"Pushed, but an empty Ollama could not pull it back from {name.host}, so users cannot "
                   f"either: {exc.message}")
        if settings.pull_check == "fail":
            raise PullCheckFailed(message + " (Set pull-check: warn to accept this.)") from exc
        github.warning(message)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _take_weights(settings: Settings, ours: OllamaClient, empty: OllamaClient, result: TagResult) -> int:
    """Give the empty Ollama the tag's weights as hard links to our Ollama's blobs, each one only when the
    registry holds it with the same digest and size. Ollama's pull skips a blob it already has, so the
    gigabytes are not downloaded a second time to prove what the digests already prove. A blob the registry
    does not confirm, or that cannot be linked (a server of the user's, another filesystem), is downloaded
    as a user would. Returns the bytes taken."""
    taken = 0
    for digest, size in result.weights:
        blob, target = ours.blob_file(digest), empty.blob_file(digest)
        if blob is None or target is None or not blob.is_file() or blob.stat().st_size != size:
            continue
        held = retry.retrying(functools.partial(registry.blob_size, settings.model_name, digest,
                                                insecure=settings.insecure_registry, key=settings.ollama_key),
                              f"checking {digest[:19]}… in the registry")
        if held != size:
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(blob, target)
        except OSError:
            continue
        taken += size
    return taken
