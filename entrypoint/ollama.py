"""Ollama: start a private server, and a small client for the HTTP API calls the pipeline makes.

Streaming endpoints answer NDJSON; an error that happens after streaming began arrives as a final
`{"error": ...}` line on an HTTP 200, so every line is checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from . import github, registry
from .errors import InputError, OllamaError, OllamaRefused, OllamaUnreachable, PublishError, RegistryError, ToolMissing
from .process import running

DEFAULT_BIND = "127.0.0.1:11434"
HEALTH_TIMEOUT_S = 60.0
UNLOAD_TIMEOUT_S = 60.0
CHUNK = 8 * 1024 * 1024


# A part upload Ollama tries again, in its server log (server/upload.go, slog's text format).
_RESENT_PART = re.compile(r'msg="(\w{12} part \d+ attempt \d+ failed: .*?, retrying in [^"]+)"')


class OllamaClient:
    def __init__(self, base_url: str, models_dir: Path | None = None, timeout: float = 600,
                 server_log: Path | None = None):
        self.base_url = base_url.rstrip("/")
        self.models_dir = models_dir  # known only for a server we started: lets us read its manifests
        self.server_log = server_log  # likewise: what it logs that its API does not say
        self.timeout = timeout
        self.session = requests.Session()

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _send(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """One HTTP call; a server that does not answer (it stopped, or timed out) becomes a PublishError."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            return self.session.request(method, self._url(path), **kwargs)
        except requests.RequestException as exc:
            raise OllamaUnreachable(f"Ollama {what} failed: the server at {self.base_url} did not answer ({exc}).",
                                    title="Ollama unreachable") from exc

    def _check(self, response: requests.Response, what: str) -> requests.Response:
        if response.status_code >= 400:
            try:
                detail = response.json().get("error", response.text)
            except ValueError:
                detail = response.text
            raise OllamaRefused(f"Ollama {what} failed ({response.status_code}): {detail}",
                                status=response.status_code, title=f"Ollama {what} failed", detail=str(detail))
        return response

    def is_healthy(self) -> bool:
        try:
            return self.session.get(self._url("/"), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def version(self) -> str:
        return self._check(self._send("GET", "/api/version", "version", timeout=10), "version").json()["version"]

    def upload_blob(self, path: Path) -> str:
        """Upload a file as a blob (streamed, skipped when the server has it); return its digest."""
        digest = "sha256:" + file_sha256(path)
        if self._send("HEAD", f"/api/blobs/{digest}", "blob check", timeout=30).status_code == 200:
            github.log(f"blob {digest[:19]}… already on the server")
            return digest
        if self._hand_over(path, digest):
            return digest
        size = path.stat().st_size
        github.log(f"uploading {path.name} ({size / 1e6:.1f} MB) as {digest[:19]}…")
        with path.open("rb") as f:  # a file object is streamed with its Content-Length, not read into memory
            response = self._send("POST", f"/api/blobs/{digest}", "blob upload", data=f)
        self._check(response, "blob upload")
        return digest

    def _hand_over(self, path: Path, digest: str) -> bool:
        """Give our own server the file without copying it: a hard link where it keeps blobs, when that
        is on the same filesystem. Saves the disk of a second copy of every GGUF."""
        blob = self.blob_file(digest)
        if blob is None:
            return False
        try:
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, blob)
        except FileExistsError:
            pass
        except OSError:  # another filesystem, or links not allowed: upload instead
            return False
        if self._send("HEAD", f"/api/blobs/{digest}", "blob check", timeout=30).status_code != 200:
            blob.unlink(missing_ok=True)
            return False
        github.log(f"{path.name} handed to Ollama as {digest[:19]}… (hard link, no copy)")
        return True

    def stream(self, path: str, body: dict[str, Any], what: str) -> Iterator[dict[str, Any]]:
        """POST a streaming request and yield its status lines; raise on any error line."""
        with self._send("POST", path, what, json={**body, "stream": True}, stream=True) as response:
            self._check(response, what)
            for raw in self._lines(response, what):
                if not raw:
                    continue
                line = json.loads(raw)
                if "error" in line:
                    raise OllamaRefused(f"Ollama {what} failed: {line['error']}", status=response.status_code,
                                        title=f"Ollama {what} failed", detail=str(line["error"]))
                yield line

    def _lines(self, response: requests.Response, what: str) -> Iterator[bytes]:
        try:
            yield from response.iter_lines()
        except requests.RequestException as exc:  # the server went away mid-stream
            raise OllamaUnreachable(f"Ollama {what} failed: the server at {self.base_url} stopped answering ({exc}).",
                                    title="Ollama unreachable") from exc

    def create(self, body: dict[str, Any], quiet: bool = False) -> None:
        last = None
        for line in self.stream("/api/create", body, "create"):
            status = line.get("status", "")
            if status != last and not quiet:
                github.log(f"  {status}")
            last = status
        if last != "success":
            raise OllamaError(f"Ollama create of {body['model']} ended without success (last status: {last}).",
                              title="Ollama create failed")

    def chat(self, model: str, messages: list[dict[str, Any]], options: dict[str, Any],
             tools: list[dict[str, Any]] | None = None, think: bool | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": messages, "options": options, "stream": False}
        if tools is not None:
            body["tools"] = tools
        if think is not None:
            body["think"] = think
        return self._check(self._send("POST", "/api/chat", "chat", json=body), "chat").json()

    def render_chat(self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    think: bool | None = None) -> str:
        """The prompt a chat request renders to, as the model would get it, without running the model."""
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False, "_debug_render_only": True}
        if tools is not None:
            body["tools"] = tools
        if think is not None:
            body["think"] = think
        response = self._check(self._send("POST", "/api/chat", "chat rendering", json=body), "chat rendering")
        return response.json()["_debug_info"]["rendered_template"]

    def embed(self, model: str, inputs: list[str]) -> list[list[float]]:
        body = {"model": model, "input": inputs}
        return self._check(self._send("POST", "/api/embed", "embed", json=body), "embed").json().get("embeddings", [])

    def show(self, model: str) -> dict[str, Any]:
        return self._check(self._send("POST", "/api/show", "show", json={"model": model}, timeout=60), "show").json()

    def delete(self, model: str) -> None:
        self._check(self._send("DELETE", "/api/delete", "delete", json={"model": model}, timeout=60), "delete")

    def unload(self, model: str) -> None:
        """Stop the model's llama-server, if it runs, and wait until it has stopped. Ollama keeps one per
        GGUF and hands it to any model made from that GGUF, with the flags it was started with: a model
        re-created to render its Jinja would otherwise get one started without --jinja."""
        self._check(self._send("POST", "/api/generate", "unload", json={"model": model, "keep_alive": 0}), "unload")
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        while any(m.get("name") == model for m in self._check(self._send("GET", "/api/ps", "list running models"),
                                                               "list running models").json().get("models", [])):
            if time.monotonic() > deadline:
                raise OllamaError(f"Ollama did not stop {model} within {UNLOAD_TIMEOUT_S:.0f} s.",
                                  title="Ollama unload failed")
            time.sleep(0.2)

    def push(self, model: str, insecure: bool, on_progress: Callable[[dict[str, Any]], None]) -> None:
        """Push through Ollama's API; the registry's refusals and network failures (error lines) become
        RegistryError, retriable unless the registry refused."""
        self._transfer("push", model, insecure, on_progress)

    def pull(self, model: str, insecure: bool, on_progress: Callable[[dict[str, Any]], None]) -> None:
        """Pull through Ollama's API, failing as push does."""
        self._transfer("pull", model, insecure, on_progress)

    def _transfer(self, what: str, model: str, insecure: bool, on_progress: Callable[[dict[str, Any]], None]) -> None:
        last = None
        try:
            for line in self.stream(f"/api/{what}", {"model": model, "insecure": insecure}, what):
                on_progress(line)
                last = line.get("status")
        except OllamaRefused as exc:
            if exc.status >= 400:  # Ollama itself refused the request, before any registry was asked
                raise
            status = push_error_status(exc.detail)
            refused = status is not None and not registry.retriable_status(status)
            final = refused or any(reason in exc.detail for reason in NOT_RETRIABLE)
            hint = "".join(text for reason, text in ((NO_REDIRECT, NO_REDIRECT_HINT), (REALM_ELSEWHERE, REALM_HINT))
                           if reason in exc.detail)
            raise RegistryError(f"{what.capitalize()}ing {model} failed: {exc.detail}{hint}", status=status,
                                retriable=not final, title=f"{what.capitalize()} refused" if refused
                                else f"{what.capitalize()} failed") from exc
        if last != "success":
            raise RegistryError(f"Ollama {what} of {model} ended without success (last status: {last}).",
                                status=None, retriable=True, title=f"{what.capitalize()} failed")

    def log_size(self) -> int:
        """Where the server's log ends now (0 without one), for resent_parts."""
        return self.server_log.stat().st_size if self.server_log and self.server_log.exists() else 0

    def resent_parts(self, since: int) -> list[str]:
        """The part uploads the server tried again since `since` (its log's size then), as its log says them
        (upload.go logs "<digest> part <n> attempt <try> failed: <why>, retrying in <delay>"). Its push
        stream does not say: there a retried part looks like a redirected one."""
        if not self.server_log or not self.server_log.exists():
            return []
        with self.server_log.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return _RESENT_PART.findall(text)

    def list_models(self) -> list[dict[str, Any]]:
        return self._check(self._send("GET", "/api/tags", "list", timeout=30), "list").json().get("models", [])

    def model_digest(self, model: str) -> tuple[str, int]:
        """The manifest digest and total size Ollama reports for a local model."""
        for entry in self.list_models():
            if entry.get("name") == model or entry.get("model") == model:
                return "sha256:" + entry["digest"], int(entry["size"])
        raise OllamaError(f"Ollama does not list {model} after creating it.", title="Ollama create failed")

    def blob_file(self, digest: str) -> Path | None:
        """Where our own server keeps a blob (None for a server we did not start)."""
        return None if self.models_dir is None else self.models_dir / "blobs" / digest.replace(":", "-")

    def local_manifest(self, host: str, namespace: str, model: str, tag: str) -> bytes | None:
        """The manifest file Ollama stored for a model (no API returns it), or None for a server we did not
        start. A push sends these bytes without their final newline."""
        if self.models_dir is None:
            return None
        path = self.models_dir / "manifests" / host / namespace / model / tag
        return path.read_bytes() if path.is_file() else None


# How Ollama words a registry's answer in a push's error line (server/images.go makeRequestWithRetry and
# errUnauthorized, server/auth.go, server/upload.go): "401: <body>" (or "401" when the body is empty),
# "http status 403 Forbidden: <body>", possibly after "max retries exceeded: "; "unauthorized: access
# denied" once its token retry failed. Anything else is the connection's own failure. Anchored, so that a
# digest's digits are never read as a status.
_PUSH_STATUS = re.compile(r"(?:^|: )(?:http status )?([1-5]\d\d)(?::| [A-Z]|$)")
INSECURE_PROTOCOL = "insecure protocol http"  # an http registry used without insecure-registry
# Ollama (0.30 and later) downloads a blob only from where the registry redirects it (307 to another host,
# as ollama.com to its CDN); a registry that serves blobs itself gets this error, on every attempt.
NO_REDIRECT = "no Location header"
NO_REDIRECT_HINT = (". Ollama 0.30 and later download blobs only where the registry redirects them (a 307 to "
                    "another host, as ollama.com sends them to its CDN); this registry serves them itself, so no "
                    "current Ollama can pull from it.")
NOT_RETRIABLE = (INSECURE_PROTOCOL, NO_REDIRECT)
# Ollama answers a registry's 401 only by asking the realm of its Bearer challenge for a token, signed with
# its key, and only on the registry's own host (server/auth.go); a Basic challenge (no realm) or a token
# server elsewhere ends with this.
REALM_ELSEWHERE = "does not match original host"
REALM_HINT = (". The registry demands credentials that Ollama cannot give: it answers a 401 only by asking the "
              "registry's own host for a token, signed with its key (a Bearer realm there), and sends no passwords.")


def push_error_status(detail: str) -> int | None:
    """The registry's HTTP status in an Ollama push error line, or None when the registry did not answer."""
    if detail.startswith("unauthorized: access denied") or REALM_ELSEWHERE in detail:
        return 401
    match = _PUSH_STATUS.search(detail)
    return int(match.group(1)) if match else None


def _chunks(f) -> Iterator[bytes]:
    while block := f.read(CHUNK):
        yield block


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in _chunks(f):
            h.update(block)
    return h.hexdigest()


def bind_address(ollama_host: str) -> str:
    """host:port for the server from an OLLAMA_HOST value ('', 'host', 'host:port', with or without scheme)."""
    value = ollama_host.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
    if not value:
        return DEFAULT_BIND
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        host, port = value, DEFAULT_BIND.rpartition(":")[2]
    return f"{host or '127.0.0.1'}:{port}"


def free_loopback_address() -> str:
    """host:port of a loopback port nobody listens on, for a second server of our own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _port_is_free(bind: str) -> bool:
    host, _, port = bind.rpartition(":")
    with socket.socket() as s:
        return s.connect_ex((host or "127.0.0.1", int(port))) != 0


# What our Ollama server gets of the action's environment: its own settings, the locale, proxies and
# certificates a registry may need; never the inputs, tokens or the runner's ACTIONS_* and GITHUB_*.
SERVER_PASSES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY",
                 "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")
SERVER_PASSES_PREFIXES = ("OLLAMA_", "LLAMA_ARG_")


def server_environment(bind: str, models_dir: Path, home: Path) -> dict[str, str]:
    passed = {name: value for name, value in os.environ.items()
              if name in SERVER_PASSES or name.startswith(SERVER_PASSES_PREFIXES)}
    # The checks use one model at a time: runners of models already checked would only hold memory.
    # OLLAMA_NO_CLOUD: no calls to ollama.com at start (model recommendations, cloud models).
    return {"OLLAMA_MAX_LOADED_MODELS": "1", **passed, "OLLAMA_HOST": bind, "OLLAMA_MODELS": str(models_dir),
            "OLLAMA_NO_CLOUD": "1", "HOME": str(home)}


@contextlib.contextmanager
def signing_key(home: Path, key: str) -> Iterator[None]:
    """The push key as HOME/.ollama/id_ed25519 (0600) for the block, removed after it. An Ollama server whose
    HOME it is reads the file at each request it signs (auth.Sign), so the key can come and go while it
    runs; one started without a key made a throwaway one, which this replaces."""
    key_path = home / ".ollama" / "id_ed25519"
    key_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        key_path.unlink(missing_ok=True)
        # Created with 0600 from the start, so the key is never readable by others, even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        key_path.with_name("id_ed25519.pub").unlink(missing_ok=True)
        yield
    finally:
        key_path.unlink(missing_ok=True)
        key_path.with_name("id_ed25519.pub").unlink(missing_ok=True)


@contextlib.contextmanager
def serve(log_path: Path, models_dir: Path, home: Path, ollama_key: str = "",
          bind: str = "") -> Iterator[OllamaClient]:
    """Run `ollama serve` for the duration of the block (bound to `bind`, else $OLLAMA_HOST or 127.0.0.1:11434),
    keeping its models in `models_dir`, with `home` as its HOME: the user's own ~/.ollama (their Ollama
    identity) is never touched. With `ollama_key`, the server signs with it (signing_key) for the block.
    """
    binary = os.environ.get("OLLAMA_BIN") or shutil.which("ollama")
    if not binary:
        raise ToolMissing("The ollama binary was not found. Inside the action's image it is preinstalled; when "
                          "running the CLI elsewhere run scripts/bootstrap, or set ollama-host to a running server.",
                          tool="ollama")
    bind = bind or bind_address(os.environ.get("OLLAMA_HOST", ""))
    if not _port_is_free(bind):
        raise InputError(f"Something already listens on {bind}, where the action starts its Ollama server. "
                         "Stop it, or set ollama-host to use that server.", input_name="ollama-host")
    for folder in (log_path.parent, home):
        folder.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if ollama_key:
            stack.enter_context(signing_key(home, ollama_key))
        log_file = stack.enter_context(log_path.open("ab"))
        server = stack.enter_context(running([binary, "serve"], what="The Ollama server", stdout=log_file,
                                             stderr=subprocess.STDOUT,
                                             env=server_environment(bind, models_dir, home)))
        client = OllamaClient(f"http://{bind}", models_dir=models_dir, server_log=log_path)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not client.is_healthy():
            if server.poll() is not None or time.monotonic() > deadline:
                raise OllamaError(
                    f"The Ollama server did not become healthy on {bind} within {HEALTH_TIMEOUT_S:.0f} s. "
                    f"Last lines of its log:\n{_tail(log_path)}", title="Ollama server failed to start")
            time.sleep(0.2)
        github.log(f"Ollama {client.version()} is running on {bind}")
        try:
            yield client
        except PublishError as exc:
            if isinstance(exc, OllamaUnreachable):  # did the server crash? It may take a moment to exit
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(timeout=5)
            if server.poll() is None:
                raise
            raise OllamaError(f"{exc.message}\nThe Ollama server had exited (code {server.returncode}). Last "
                              f"lines of its log:\n{_tail(log_path)}", title="Ollama server stopped") from exc


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
