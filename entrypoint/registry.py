"""Ollama model names and the registry they are pushed to.

A name is `[http(s)://]host/namespace/model[:tag]`; ollama.com's host is registry.ollama.ai. Before a
push each tag is looked up, and after it the manifest is read back, through the registry's OCI `/v2/`
API. A registry that answers 401 with a Bearer challenge (ollama.com, for a private model) is asked for a
token the way Ollama asks (its server/auth.go and auth/auth.go): a GET of the challenge's realm on the
same host, signed with the push key, so the action reads what the key's owner can read.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import secrets
import socket
import ssl
import time
import urllib.parse

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

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
    """Fail before any work when the registry does not answer: any HTTP answer from /v2/ (401 too). With
    insecure-registry, Ollama talks plain HTTP (its --insecure); a registry that speaks TLS there cannot
    be pushed to that way, whatever its certificate."""
    url = f"{registry_base_url(name, insecure)}/v2/"
    try:
        response = requests.get(url, timeout=timeout)
    except requests.exceptions.SSLError as exc:
        raise RegistryError(f"The registry at {url} has a TLS certificate this runner does not trust ({exc}). "
                            "Ollama will not push to it either: give the registry a certificate from a trusted "
                            "authority, or add its CA to the runner's. (insecure-registry does not help: it means "
                            "plain HTTP.)", status=None, retriable=False, input_name="ollama-model",
                            title="Registry certificate not trusted") from exc
    except requests.RequestException as exc:
        if insecure and _speaks_tls(name.host, timeout):
            raise _plain_http_to_tls(name) from exc
        plain_http = "" if insecure else " For a registry served over plain HTTP, set insecure-registry: true."
        raise RegistryError(f"The registry at {url} does not answer ({exc}). Check the host in ollama-model and "
                            f"that the registry is up.{plain_http}", status=None, retriable=True,
                            input_name="ollama-model", title="Registry unreachable") from exc
    # A TLS server answers plain HTTP with 400 (a registry's /v2/ answers 200 or 401): make sure.
    if insecure and response.status_code == 400 and _speaks_tls(name.host, timeout):
        raise _plain_http_to_tls(name)


def _plain_http_to_tls(name: ModelName) -> InputError:
    return InputError(f"The registry at {name.host} speaks TLS, and insecure-registry: true makes Ollama talk plain "
                      "HTTP to it (as 'ollama push --insecure' does), so no push can work. Set insecure-registry: "
                      "false and give the registry a certificate the runner trusts.", input_name="insecure-registry")


def _speaks_tls(host: str, timeout: float) -> bool:
    """Whether a TLS handshake succeeds at host[:port] (port 80 by default, where plain HTTP would go)."""
    hostname, _, port = host.partition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # any certificate: only the protocol counts
    try:
        with socket.create_connection((hostname, int(port or 80)), timeout=min(timeout, 10)) as raw:
            with context.wrap_socket(raw, server_hostname=hostname):
                return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError: not TLS, or nothing listening
        return False


def _may_answer_later(exc: requests.RequestException) -> bool:
    """A connection that failed may work later; a TLS certificate that does not verify will not."""
    return not isinstance(exc, requests.exceptions.SSLError)


def fetch_manifest(name: ModelName, tag: str, *, insecure: bool, key: str = "",
                   timeout: float = 30) -> tuple[str, dict] | None:
    """Read a tag's manifest from the registry: (digest, manifest), or None if the tag is absent. The digest
    is that of the bytes served (a Docker-Content-Digest header, optional in OCI, must agree); the manifest
    is read whatever its Content-Type (ollama.com is reported to send text/plain). With `key`, a Bearer
    challenge is answered as Ollama answers it."""
    url = f"{registry_base_url(name, insecure)}/v2/{name.namespace}/{name.model}/manifests/{tag}"
    response = _authorized("GET", url, {"Accept": MANIFEST_MEDIA_TYPE}, key, timeout)
    if response.status_code == 404:
        return None
    if response.status_code in (401, 403):
        fix = (" Check that ollama-key is the key registered with the registry for the namespace in ollama-model "
               "(on ollama.com: Settings > Ollama keys) or, if the model is private, that it belongs to that "
               "account." if key else " The model may be private, and without ollama-key the action reads the "
               "registry anonymously: publish a private model with the action's own server and ollama-key (not "
               "ollama-host), so that the action can read it as its owner.")
        raise RegistryError(f"The registry refused to show {url} ({response.status_code}).{fix}",
                            status=response.status_code, retriable=False, title="Registry refused",
                            input_name="ollama-key")
    if response.status_code != 200:
        raise RegistryError(f"The registry answered {response.status_code} for {url}: {response.text[:300]}",
                            status=response.status_code, retriable=retriable_status(response.status_code),
                            title="Registry error")
    digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
    stated = response.headers.get("Docker-Content-Digest")
    if stated and stated != digest:
        raise RegistryError(f"The registry says the manifest at {url} is {stated}, but the bytes it sent hash to "
                            f"{digest}. The registry (or a proxy in front of it) changes manifests; it cannot be "
                            "published to safely.", status=200, retriable=False, title="Registry error")
    try:
        manifest = json.loads(response.content)
    except ValueError as exc:
        raise RegistryError(f"The registry's manifest at {url} is not JSON ({exc}).", status=200, retriable=False,
                            title="Registry error") from exc
    return digest, manifest


def blob_size(name: ModelName, digest: str, *, insecure: bool, key: str = "", timeout: float = 30) -> int | None:
    """The size the registry gives for a blob it holds (HEAD, following a redirect to where it serves blobs
    as a pull does), or None when it does not hold it or does not say. A registry takes a blob only once its
    bytes hash to the digest (the OCI distribution spec), so a blob it holds is the one pushed."""
    url = f"{registry_base_url(name, insecure)}/v2/{name.namespace}/{name.model}/blobs/{digest}"
    response = _authorized("HEAD", url, {}, key, timeout)
    length = response.headers.get("Content-Length", "")
    return int(length) if response.status_code == 200 and length.isdigit() else None


def _authorized(method: str, url: str, headers: dict[str, str], key: str, timeout: float) -> requests.Response:
    """The answer to a request, answering a Bearer challenge as Ollama does when there is a key."""
    response = _send(method, url, headers, timeout)
    challenge = response.headers.get("WWW-Authenticate", "")
    if response.status_code == 401 and key and challenge.startswith("Bearer "):
        authorization = "Bearer " + _token(challenge, url, key, timeout)
        response = _send(method, url, {**headers, "Authorization": authorization}, timeout)
    return response


def _send(method: str, url: str, headers: dict[str, str], timeout: float) -> requests.Response:
    try:
        return requests.request(method, url, headers=headers, timeout=timeout)
    except requests.RequestException as exc:
        raise RegistryError(f"Could not reach the registry at {url}: {exc}", status=None,
                            retriable=_may_answer_later(exc), title="Registry unreachable") from exc


def _token(challenge: str, url: str, key: str, timeout: float) -> str:
    """A token for the challenge's scope, from its realm (Ollama's getAuthorizationToken): the realm's URL
    with service, scope, ts and nonce, signed as `GET,<url>,<base64 of the hex SHA-256 of an empty body>`.
    The realm must be on the registry's own host (as Ollama requires), so no signature goes elsewhere."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = urllib.parse.urlsplit(fields.get("realm", ""))
    if realm.netloc != urllib.parse.urlsplit(url).netloc:
        raise RegistryError(f"The registry at {url} sends token requests to {fields.get('realm')!r}, another host; "
                            "the key is not sent there.", status=401, retriable=False, title="Registry refused")
    query = urllib.parse.parse_qsl(realm.query) + [("service", fields.get("service", ""))]
    query += [("scope", scope) for scope in fields.get("scope", "").split(" ")]
    query += [("ts", str(int(time.time()))), ("nonce", secrets.token_urlsafe(16))]
    token_url = realm._replace(query=urllib.parse.urlencode(query)).geturl()
    empty_body = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
    signature = sign(key, f"GET,{token_url},{empty_body}".encode())
    response = _send("GET", token_url, {"Authorization": signature}, timeout)
    if response.status_code >= 400:
        raise RegistryError(f"The registry's token server refused ollama-key ({response.status_code}: "
                            f"{response.text[:200].strip()}). Register the key's public part with the registry (on "
                            "ollama.com: Settings > Ollama keys, the content of id_ed25519.pub) under the account "
                            "whose namespace ollama-model names.", status=response.status_code,
                            retriable=retriable_status(response.status_code), input_name="ollama-key",
                            title="Registry refused the key")
    try:
        return str(response.json()["token"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"The registry's token server answered without a token: {response.text[:200]!r}.",
                            status=response.status_code, retriable=False, title="Registry error") from exc


def sign(key: str, data: bytes) -> str:
    """Ollama's signature of `data` with an OpenSSH ed25519 private key (auth.Sign): the public key in
    OpenSSH's base64 form, a colon, and the raw ed25519 signature in base64."""
    private = serialization.load_ssh_private_key(key.encode(), password=None)
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise InputError("ollama-key is not an ed25519 key. Use the key Ollama made (~/.ollama/id_ed25519).",
                         input_name="ollama-key")
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{public.split()[1].decode()}:{base64.b64encode(private.sign(data)).decode()}"
