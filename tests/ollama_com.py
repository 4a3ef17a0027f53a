"""A registry that behaves like ollama.com toward Ollama: a front over the real docker-registry
(tests/servers.registry), built from what Ollama 0.34.3's client code expects. It is not ollama.com
(which cannot be reached from here), and says which of its behaviours are assumed.

From Ollama's code (server/auth.go, auth/auth.go, server/images.go, server/download.go):
- a request the key's owner must make answers 401 with `WWW-Authenticate: Bearer realm=..., service=...,
  scope=...`; Ollama asks the realm, which must be on the same host (auth.go refuses any other), for a
  token: a GET with the challenge's service and scopes, a unix `ts` and a `nonce`, whose Authorization
  is `<public key, OpenSSH base64>:<ed25519 signature, base64>` over
  `GET,<that URL>,<base64 of the hex SHA-256 of an empty body>`; the answer is `{"token": ...}`, sent
  back as `Authorization: Bearer <token>` (images.go makeRequestWithRetry, one retry);
- blob downloads are redirected to another host, as ollama.com's are to its CDN (the registry's own
  redirect middleware does it here);
- blob uploads in parts (server/upload.go): Ollama PATCHes each part with `X-Redirect-Uploads: 1`; a 307
  sends the part to a storage host (Location, PUT there without the token, retried by Ollama on its own)
  and names the URL for the next part (Docker-Upload-Location); a final PUT with `digest` and `etag`
  commits the blob. Here the storage host keeps the parts, and the commit hands them to the registry.

Assumed (reported by users, or as registries with token servers commonly do):
- a key belongs to one account, whose namespace it may push to and read; other keys get no access to a
  private model, and a token request that would grant nothing is refused (403); an unknown key, 401;
- private models answer reads without a token with the same challenge (`private`);
- manifests are served as text/plain, without Docker-Content-Digest and without Content-Length
  (oras-project/oras-go#882, ollama/ollama#6470): each a switch, all on by default, the strictest.
The storage host can fail part uploads mid-body (`cut_part_uploads`: a dropped connection or a 502), as
big pushes to ollama.com are reported to fail mid-way (502s, "max retries exceeded").
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.server
import json
import re
import secrets
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from tests import servers

EMPTY_BODY = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
_REPOSITORY_PATH = re.compile(r"^/v2/(?P<namespace>[^/]+)/(?P<model>[^/]+)/(?P<kind>manifests|blobs)/")
_UPLOAD_PATH = re.compile(r"^/v2/[^/]+/[^/]+/blobs/uploads/(?P<upload>[0-9a-f-]+)$")
_SCOPE = re.compile(r"^repository:(?P<namespace>[^/]+)/(?P<model>[^:]+):(?P<actions>[a-z,]+)$")


@dataclasses.dataclass
class Behaviour:
    private: bool = True  # reads need the owner's token
    manifest_as_text_plain: bool = True
    digest_header: bool = False
    manifest_content_length: bool = False
    cut_part_uploads: int = 0  # the storage host fails this many part uploads halfway through their body,
    cut_with: str = "dropped connection"  # by dropping the connection, or answering "502"


@dataclasses.dataclass
class Record:
    """What the front saw: tokens given (namespace/model -> actions), and what it refused, for the tests."""
    tokens_given: list[tuple[str, frozenset[str]]] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)  # "unknown key", "bad signature", ...
    challenged: int = 0
    parts_stored: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (upload, offset) received whole
    parts_cut: int = 0
    blobs_committed: list[str] = dataclasses.field(default_factory=list)  # digests handed to the registry


class _Front(http.server.BaseHTTPRequestHandler):
    upstream: str
    keys: dict[str, str]  # OpenSSH public key body (base64) -> the namespace of its account
    behaviour: Behaviour
    record: Record
    grants: dict[str, dict[str, frozenset[str]]]  # token -> {"namespace/model": actions}
    storage: str  # host:port of the storage host
    parts: Path  # where it keeps the parts: <upload id>/<offset>

    def _handle(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/token":
            return self._token()
        match = _REPOSITORY_PATH.match(path)
        if match:
            repository = f"{match['namespace']}/{match['model']}"
            action = "pull" if self.command in ("GET", "HEAD") else "push"
            if not self._allowed(repository, action):
                return self._challenge(repository, action)
        upload = _UPLOAD_PATH.match(path)
        if upload and self.command == "PATCH" and self.headers.get("X-Redirect-Uploads") == "1":
            return self._redirect_part(upload["upload"])
        if upload and self.command == "PUT" and (self.parts / upload["upload"]).is_dir():
            return self._commit(upload["upload"])
        self._relay(manifest=bool(match) and match["kind"] == "manifests" and self.command in ("GET", "HEAD"))

    def _allowed(self, repository: str, action: str) -> bool:
        if action == "pull" and not self.behaviour.private:
            return True
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return action in self.grants.get(token, {}).get(repository, frozenset())

    def _challenge(self, repository: str, action: str) -> None:
        self.record.challenged += 1
        scope = f"repository:{repository}:{'pull' if action == 'pull' else 'push,pull'}"
        realm = f"http://{self.headers['Host']}/token"
        self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                     {"WWW-Authenticate": f'Bearer realm="{realm}",service="ollama.com",scope="{scope}"'})

    def _token(self) -> None:
        refusal = self._verify_signature()
        if refusal:
            self.record.refused.append(refusal)
            return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": refusal}]})
        public = self.headers["Authorization"].split(":", 1)[0]
        owner = self.keys[public]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        granted: dict[str, frozenset[str]] = {}
        for scope in query.get("scope", []):
            match = _SCOPE.match(scope)
            if not match:
                continue
            wanted = set(match["actions"].split(","))
            allowed = {"pull", "push"} if match["namespace"] == owner else (
                set() if self.behaviour.private else {"pull"})
            if wanted & allowed:
                granted[f"{match['namespace']}/{match['model']}"] = frozenset(wanted & allowed)
        if not granted:
            refusal = f"the key of {owner} has no access to {', '.join(query.get('scope', []))}"
            self.record.refused.append(refusal)
            return self._answer(403, {"errors": [{"code": "DENIED", "message": refusal}]})
        token = secrets.token_urlsafe(24)
        self.grants[token] = granted
        self.record.tokens_given += [(repository, actions) for repository, actions in granted.items()]
        self._answer(200, {"token": token})

    def _verify_signature(self) -> str:
        """Why the token request's signature does not hold, or "" when it does."""
        public, _, signature = self.headers.get("Authorization", "").partition(":")
        if public not in self.keys:
            return "unknown key"
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if abs(time.time() - int((query.get("ts") or ["0"])[0])) > 300:
            return "stale or missing timestamp"
        signed = f"GET,http://{self.headers['Host']}{self.path},{EMPTY_BODY}".encode()
        try:
            key = serialization.load_ssh_public_key(b"ssh-ed25519 " + public.encode())
            key.verify(base64.b64decode(signature), signed)  # type: ignore[union-attr, call-arg]
        except (InvalidSignature, ValueError):
            return "bad signature"
        return ""

    def _redirect_part(self, upload: str) -> None:
        """A part goes to the storage host; the next part's URL is this one (nothing reached the registry)."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # Ollama sends the part here first too
        start = int(self.headers["Content-Range"].split("-")[0])
        (self.parts / upload).mkdir(exist_ok=True)
        self.send_response(307)
        self.send_header("Location", f"http://{self.storage}/{upload}/{start}")
        self.send_header("Docker-Upload-Location", f"http://{self.headers['Host']}{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _commit(self, upload: str) -> None:
        """The final PUT (digest, etag): the parts, in order, go to the registry's upload, then its commit."""
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        folder = self.parts / upload
        offsets = sorted(int(part.name) for part in folder.iterdir())
        sizes = [(folder / str(offset)).stat().st_size for offset in offsets]
        if [sum(sizes[:i]) for i in range(len(offsets))] != offsets:
            return self._answer(400, {"errors": [{"code": "BLOB_UPLOAD_INVALID", "message": "parts missing"}]})
        url = urllib.parse.urlsplit(self.path)
        query = [(k, v) for k, v in urllib.parse.parse_qsl(url.query) if k not in ("digest", "etag")]
        digest = dict(urllib.parse.parse_qsl(url.query))["digest"]
        host = {"Host": self.headers["Host"]}

        def body() -> Iterator[bytes]:
            for offset in offsets:
                with (folder / str(offset)).open("rb") as part:
                    while block := part.read(1 << 20):
                        yield block

        # One streamed (chunked) PATCH of every part, then the registry's own commit.
        patched = requests.patch(f"{self.upstream}{url.path}?{urllib.parse.urlencode(query)}", data=body(),
                                 headers={**host, "Content-Type": "application/octet-stream"}, timeout=300)
        location = urllib.parse.urlsplit(patched.headers.get("Location", ""))
        committed = requests.put(f"{self.upstream}{location.path}?{location.query}&"
                                 f"{urllib.parse.urlencode({'digest': digest})}", headers=host, timeout=300)
        if committed.status_code == 201:
            self.record.blobs_committed.append(digest)
        self.send_response(committed.status_code)
        for name in ("Location", "Docker-Content-Digest"):
            if name in committed.headers:
                self.send_header(name, committed.headers[name])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _relay(self, manifest: bool) -> None:
        # Without Content-Length a manifest ends with the connection (HTTP/1.0, this handler's protocol).
        servers.forward(self, self.upstream, withheld=("authorization",),
                        answer_headers=self._manifest_headers if manifest else None)

    def _manifest_headers(self, answer: requests.Response) -> list[tuple[str, str]]:
        """A manifest's headers as the switches say registry.ollama.ai sends them."""
        if answer.status_code != 200:
            return list(answer.headers.items())
        dropped = set()
        if not self.behaviour.digest_header:
            dropped.add("docker-content-digest")
        if not self.behaviour.manifest_content_length:
            dropped.add("content-length")
        if self.behaviour.manifest_as_text_plain:
            dropped.add("content-type")
        headers = [(name, value) for name, value in answer.headers.items() if name.lower() not in dropped]
        if self.behaviour.manifest_as_text_plain:
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        return headers

    def _answer(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Storage(http.server.BaseHTTPRequestHandler):
    """The storage host: keeps each part PUT to /<upload id>/<offset>, or drops the connection halfway
    through the body while `behaviour.cut_part_uploads` says so."""
    behaviour: Behaviour
    record: Record
    parts: Path
    lock: threading.Lock

    def do_PUT(self) -> None:
        upload, offset = self.path.split("?", 1)[0].strip("/").split("/")
        size = int(self.headers.get("Content-Length") or 0)
        with self.lock:
            cut = self.record.parts_cut < self.behaviour.cut_part_uploads
            if cut:
                self.record.parts_cut += 1
        if cut:
            self.rfile.read(size // 2)
            self.close_connection = True
            if self.behaviour.cut_with == "502":
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.connection.shutdown(2)  # no answer: the connection drops mid-body
            return
        data = self.rfile.read(size)
        (self.parts / upload / str(int(offset))).write_bytes(data)
        with self.lock:
            self.record.parts_stored.append((upload, int(offset)))
        self.send_response(200)
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def public_key_body(private_key: str) -> str:
    """The base64 part of an OpenSSH private key's public key: what Ollama sends before the colon."""
    key = serialization.load_ssh_private_key(private_key.encode(), password=None)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.split()[1].decode()


@contextlib.contextmanager
def front(upstream: str, accounts: dict[str, str], behaviour: Behaviour | None = None) -> Iterator[tuple[str, Record]]:
    """An ollama.com-like front of the registry at `upstream` (host:port). `accounts` maps a namespace to
    the private key (OpenSSH text) registered for it. Yields ('host:port', what it saw)."""
    record, behaviour = Record(), behaviour or Behaviour()
    with tempfile.TemporaryDirectory(prefix="ollama-com-parts-") as parts:
        with servers.loopback(type("Storage", (_Storage,), {
                "behaviour": behaviour, "record": record, "parts": Path(parts), "lock": threading.Lock()})) as storage:
            handler = type("OllamaComFront", (_Front,), {
                "upstream": f"http://{upstream}", "keys": {public_key_body(k): ns for ns, k in accounts.items()},
                "behaviour": behaviour, "record": record, "grants": {}, "parts": Path(parts),
                # Another host name for the same loopback, as ollama.com's storage is another host.
                "storage": f"localhost:{storage}"})
            with servers.loopback(handler) as port:
                yield f"127.0.0.1:{port}", record
