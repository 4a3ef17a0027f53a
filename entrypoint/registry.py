"""Ollama model names and the registry they are pushed to.

A name is `[http(s)://]host/namespace/model[:tag]`; ollama.com's host is registry.ollama.ai. After a
push the manifest is read back through the registry's OCI `/v2/` API to prove it landed.
"""

from __future__ import annotations

import dataclasses
import re

import requests

from .errors import InputError, RegistryError

OLLAMA_COM = "registry.ollama.ai"
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$")
# Registries take lower-case repository names only; Ollama's namespaces allow no dots.
_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,79}$")
_MODEL = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


@dataclasses.dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    scheme: str = "https"

    @property
    def is_ollama_com(self) -> bool:
        return self.host == OLLAMA_COM

    def with_tag(self, tag: str) -> str:
        """The name Ollama's API uses for one tag (ollama.com models keep their short form)."""
        base = f"{self.namespace}/{self.model}" if self.is_ollama_com else f"{self.host}/{self.namespace}/{self.model}"
        return f"{base}:{tag}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.model}" if self.is_ollama_com else f"{self.host}/{self.namespace}/{self.model}"


def parse_model_name(text: str) -> ModelName:
    """Parse the `ollama-model` input; every problem names the input and how to fix it."""
    raw = text.strip()
    fix = ("Use 'namespace/model' for ollama.com (your ollama.com user name as namespace) or "
           "'host:port/namespace/model' for another registry, lower-case, without a tag.")
    scheme = "https"
    for prefix in ("https://", "http://"):
        if raw.startswith(prefix):
            scheme, raw = prefix[:-3], raw[len(prefix):]
    parts = raw.split("/")
    if len(parts) == 2:
        host, namespace, model = OLLAMA_COM, parts[0], parts[1]
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        raise InputError(f"'{text}' is not a model name. {fix}", input_name="ollama-model")
    if host in ("ollama.com", "www.ollama.com"):
        host = OLLAMA_COM
    if ":" in model:
        raise InputError(
            f"'{text}' includes a tag. Give the name without ':tag'; tags come from the 'tags' input.",
            input_name="ollama-model")
    if not _HOST.match(host):
        raise InputError(f"'{host}' in '{text}' is not a registry host. {fix}", input_name="ollama-model")
    for label, value, pattern in (("namespace", namespace, _NAMESPACE), ("model", model, _MODEL)):
        if not pattern.match(value):
            hint = f" Try '{value.lower()}'." if value.lower() != value and pattern.match(value.lower()) else ""
            allowed = "'_', '-'" if label == "namespace" else "'_', '-', ."
            raise InputError(
                f"The {label} '{value}' in '{text}' is not valid: it must start with a lower-case letter or digit "
                f"and contain only lower-case letters, digits, {allowed}.{hint} {fix}",
                input_name="ollama-model")
    return ModelName(host=host, namespace=namespace, model=model, scheme=scheme)


def validate_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise InputError(
            f"'{tag}' is not a valid tag: use letters, digits, '_', '.', '-' "
            "(at most 80, not starting with '.' or '-').",
            input_name="tags")
    return tag


def retriable_status(status: int) -> bool:
    """A server error or rate limiting may pass; any other refusal (401, 403, 404, ...) will not."""
    return status >= 500 or status == 429


def registry_base_url(name: ModelName, insecure: bool) -> str:
    scheme = "http" if insecure or name.scheme == "http" else "https"
    return f"{scheme}://{name.host}"


def check_reachable(name: ModelName, *, insecure: bool, timeout: float = 30) -> None:
    """Fail before any work when the registry does not answer: any HTTP answer from /v2/ (401 too)."""
    url = f"{registry_base_url(name, insecure)}/v2/"
    try:
        requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        plain_http = "" if insecure else " For a registry served over plain HTTP, set insecure-registry: true."
        raise RegistryError(f"The registry at {url} does not answer ({exc}). Check the host in ollama-model and "
                            f"that the registry is up.{plain_http}", status=None, retriable=_may_answer_later(exc),
                            input_name="ollama-model", title="Registry unreachable") from exc


def _may_answer_later(exc: requests.RequestException) -> bool:
    """A connection that failed may work later; a TLS certificate that does not verify will not."""
    return not isinstance(exc, requests.exceptions.SSLError)


def fetch_manifest(name: ModelName, tag: str, *, insecure: bool, timeout: float = 30) -> tuple[str, dict] | None:
    """Read a tag's manifest from the registry: (digest, manifest), or None if the tag is absent."""
    url = f"{registry_base_url(name, insecure)}/v2/{name.namespace}/{name.model}/manifests/{tag}"
    try:
        response = requests.get(url, headers={"Accept": MANIFEST_MEDIA_TYPE}, timeout=timeout)
    except requests.RequestException as exc:
        raise RegistryError(f"Could not reach the registry at {url}: {exc}", status=None,
                            retriable=_may_answer_later(exc), title="Registry unreachable") from exc
    if response.status_code == 404:
        return None
    if response.status_code in (401, 403):
        raise RegistryError(f"The registry refused to show {url} ({response.status_code}).",
                            status=response.status_code, retriable=False, title="Registry refused")
    if response.status_code != 200:
        raise RegistryError(f"The registry answered {response.status_code} for {url}: {response.text[:300]}",
                            status=response.status_code, retriable=retriable_status(response.status_code),
                            title="Registry error")
    digest = response.headers.get("Docker-Content-Digest", "")
    return digest, response.json()
