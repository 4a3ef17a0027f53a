"""Real servers for tests and the demo, each on a free loopback port with its own temporary state:
a Hub (olah serving local git repositories), an OCI registry (Debian's docker-registry) and Ollama.
The binaries come from scripts/bootstrap (its env file sets the *_BIN/CLI variables used here)."""

from __future__ import annotations

import collections
import contextlib
import datetime
import http.server
import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from entrypoint.process import stop

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(variable: str) -> str:
    value = os.environ.get(variable, "")
    if not value or not os.access(value, os.X_OK):
        raise RuntimeError(f"${variable} is not set to an executable: run the tests through scripts/test "
                           "(it runs scripts/bootstrap first)")
    return value


def wait_until(check, what: str, process: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def tmpfs(path: Path, megabytes: int) -> Iterator[Path]:
    """A size-capped tmpfs mounted at `path` (made here) for the block: a small disk that fills for real."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@contextlib.contextmanager
def _running(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    # Run in the log's folder: some servers (olah) write files into their working directory.
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                   start_new_session=True)
    try:
        yield process
    finally:
        stop(process)


@contextlib.contextmanager
def registry(root: Path, address: str = "", blob_redirect: bool = True, tls: bool = False) -> Iterator[str]:
    """Debian's docker-registry (CNCF distribution), no auth, deletes enabled. Yields 'host:port'.
    Started again with the same root and address, it serves what it stored before.

    With blob_redirect, blob downloads are answered with a 307 to a blob store on another host name
    (localhost, where the registry is 127.0.0.1), the way ollama.com sends them to its CDN: the
    registry's own redirect middleware, over a static server of its storage folder. Ollama (0.30 and
    later) pulls blobs only that way; without it, the registry serves blobs itself, as most do. With tls,
    it serves HTTPS with a self-signed certificate (made here) that nothing trusts."""
    root.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    data = root / "data"
    data.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        middleware = ""
        if blob_redirect:
            store = stack.enter_context(_blob_store(data))
            middleware = f"middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {store}\n"
        config = root / "config.yml"
        certificate = f"  tls:\n    certificate: {root / 'cert.pem'}\n    key: {root / 'key.pem'}\n" if tls else ""
        if tls:
            _self_signed_certificate(root / "cert.pem", root / "key.pem")
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n"
            f"{middleware}http:\n  addr: {address}\n{certificate}")
        log = root / f"registry-{time.monotonic_ns()}.log"
        process = stack.enter_context(_running([_tool("DOCKER_REGISTRY_BIN"), "serve", str(config)], log))
        scheme, trust = ("https", str(root / "cert.pem")) if tls else ("http", True)
        wait_until(lambda: requests.get(f"{scheme}://{address}/v2/", timeout=2, verify=trust).status_code == 200,
                   "docker-registry", process, log)
        yield address


def _self_signed_certificate(certificate: Path, key: Path) -> None:
    """A certificate for 127.0.0.1 signed by its own key, valid for a day."""
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    signed = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now)
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(private, hashes.SHA256()))
    certificate.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


# Bytes each blob store has sent, by file path (a registry's blob path holds its digest): what a test
# proves was, or was not, downloaded. Per test process, as the stack is.
SERVED_BYTES: collections.Counter[str] = collections.Counter()


class _StaticFiles(http.server.BaseHTTPRequestHandler):
    """GET (with a byte range, as Ollama downloads blobs in parts) and HEAD of the files under `root`."""
    root: Path

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = (self.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start, end = int(wanted[1]), min(int(wanted[2] or size - 1), size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            with path.open("rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0 and (block := f.read(min(left, 1 << 20))):
                    self.wfile.write(block)
                    left -= len(block)
                    SERVED_BYTES[str(path)] += len(block)

    def log_message(self, format: str, *args: object) -> None:  # quiet: the test output is the action's
        pass


@contextlib.contextmanager
def loopback(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """`handler` served on a free loopback port, in threads, for the block. Yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _blob_store(root: Path) -> Iterator[str]:
    """A static file server of `root` on loopback, named localhost. Yields its base URL."""
    with loopback(type("BlobStore", (_StaticFiles,), {"root": root.resolve()})) as port:
        yield f"http://localhost:{port}/"


# What a relay's intercept answers instead of the upstream: a status, or a status and headers.
Answer = int | tuple[int, dict[str, str]]


def forward(handler: http.server.BaseHTTPRequestHandler, upstream: str, withheld: tuple[str, ...] = (),
            answer_headers: Callable[[requests.Response], list[tuple[str, str]]] | None = None) -> None:
    """Send the request `handler` holds on to `upstream` (http://host:port), keeping its Host header (so a
    registry's upload Locations point back at the front) but not the `withheld` ones, and stream the answer
    back, with `answer_headers(answer)` as its headers if given. Redirects are passed on, not followed."""
    body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    dropped = ("content-length", "connection", *withheld)
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in dropped}
    answer = requests.request(handler.command, upstream + handler.path, headers=headers, data=body,
                              allow_redirects=False, stream=True, timeout=120)
    handler.send_response(answer.status_code)
    for name, value in (answer_headers or (lambda a: list(a.headers.items())))(answer):
        if name.lower() not in ("transfer-encoding", "connection", "content-encoding"):
            handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        for block in answer.raw.stream(1 << 20, decode_content=False):
            handler.wfile.write(block)


class _Relay(http.server.BaseHTTPRequestHandler):
    """Relays every request to `upstream` (keeping the Host header, so a registry's upload Locations point
    back here) unless `intercept(method, path)` returns an Answer to give instead (with an empty body)."""
    upstream: str
    intercept: Callable[[str, str], Answer | None]

    def _relay(self) -> None:
        answer_instead = self.intercept(self.command, self.path)
        if answer_instead is not None:
            status, extra = answer_instead if isinstance(answer_instead, tuple) else (answer_instead, {})
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        forward(self, self.upstream)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def relay(upstream: str, intercept: Callable[[str, str], Answer | None]) -> Iterator[str]:
    """A front of a server (http://host:port) that may answer some requests itself. Yields 'host:port'."""
    with loopback(type("Relay", (_Relay,), {"upstream": upstream, "intercept": staticmethod(intercept)})) as port:
        yield f"127.0.0.1:{port}"


def add_model_repo(mirrors: Path, repo_id: str, checkpoint: Path, tags: tuple[str, ...] = ()) -> Path:
    """Commit a checkpoint folder (with its subfolders) as a git repository in olah's mirror layout (branch main).

    Disk: a run commits the same 270 MB of weights in dozens of repos. Every repo of a Hub writes its objects
    to one store beside the mirrors, and finds them there through git's alternates, so each distinct file is
    stored once; the commit is made from the checkpoint folder itself, so the repo has no copy of the files
    (olah serves the commits' objects, not a working tree)."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    shared = mirrors.parent / "shared-objects"
    shared.mkdir(exist_ok=True)
    git = ["git", "--git-dir", str(repo / ".git"), "--work-tree", str(checkpoint),
           "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / ".git" / "objects" / "info" / "alternates").write_text(f"{shared}\n")
    # Weights stored as they are: zlib at git's default level takes most of the time of committing them,
    # and saves little on weights. (Every commit of the repo, a test's branches too, follows this.)
    for setting in ("core.compression", "core.loosecompression"):
        subprocess.run(["git", "-C", str(repo), "config", setting, "0"], check=True)
    writing_to_shared = {**os.environ, "GIT_OBJECT_DIRECTORY": str(shared)}
    subprocess.run(git + ["add", "-A"], check=True, env=writing_to_shared)
    subprocess.run(git + ["commit", "-q", "-m", f"{repo_id} checkpoint"], check=True, env=writing_to_shared)
    for tag in tags:
        subprocess.run(git + ["tag", tag], check=True)
    return repo


@contextlib.contextmanager
def hub(root: Path, port: int = 0) -> Iterator[tuple[str, Path]]:
    """olah in offline mode serving git repos under root/mirrors. Yields (endpoint URL, mirrors dir).
    Repos under private-org/ answer 401 RepoNotFound, as the Hub answers anonymous requests for a private
    repo. Started again with the same root and port, it serves the same repos."""
    mirrors = root / "mirrors"
    mirrors.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{root / "repos"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        "[accessibility]\noffline = true\n"
        + "".join(f'[[accessibility.proxy]]\nrepo = "{pattern}"\nallow = {allow}\n'
                  for pattern, allow in (("*", "true"), ("*/*", "true"), ("private-org/*", "false"))))
    endpoint = f"http://127.0.0.1:{port}"
    log = root / f"olah-{time.monotonic_ns()}.log"
    with _running([_tool("OLAH_CLI"), "-c", str(config)], log) as process:
        # Any HTTP answer means it is up (its index page itself fails to render with current jinja2).
        wait_until(lambda: requests.get(f"{endpoint}/api/models/none/none", timeout=2) is not None, "olah", process,
                   log)
        yield endpoint, mirrors


@contextlib.contextmanager
def ollama(home: Path, models: Path | None = None) -> Iterator[str]:
    """An Ollama server with its own HOME, its models in `models` (default HOME/.ollama/models, Ollama's
    own default). Yields its URL."""
    home.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_MODELS"}
    env.update({"HOME": str(home), "OLLAMA_HOST": address, **({"OLLAMA_MODELS": str(models)} if models else {})})
    with _running([_tool("OLLAMA_BIN"), "serve"], home / "ollama.log", env=env) as process:
        wait_until(lambda: requests.get(f"http://{address}/", timeout=2).status_code == 200,
                   "ollama", process, home / "ollama.log")
        yield f"http://{address}"


@contextlib.contextmanager
def docker_engine(root: Path) -> Iterator[str]:
    """A Docker engine of its own, with an empty image store in root: as a hosted runner's is when a job
    starts. Host networking only, as scripts/engine starts ours. Yields its DOCKER_HOST."""
    run_dir = Path(tempfile.mkdtemp(prefix="op-docker-", dir="/run"))  # the socket's path must be short
    socket_path = run_dir / "docker.sock"
    # Apart from any other engine's, should they share a containerd; containerd takes letters and digits
    # joined by single separators (mkdtemp's names may hold "__").
    namespace = "op-docker-" + secrets.token_hex(4)
    command = [shutil.which("dockerd") or "dockerd", "--data-root", str(root / "data"), "--exec-root", str(run_dir),
               "--pidfile", str(run_dir / "dockerd.pid"), "-H", f"unix://{socket_path}", "--bridge=none",
               "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--containerd-namespace", namespace,
               "--containerd-plugins-namespace", f"{namespace}-plugins"]
    root.mkdir(parents=True, exist_ok=True)
    log = root / "dockerd.log"
    try:
        with _running(command, log) as process:
            wait_until(lambda: _docker_answers(f"unix://{socket_path}"), "dockerd", process, log)
            yield f"unix://{socket_path}"
    finally:
        shutil.rmtree(root / "data", ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def _docker_answers(docker_host: str) -> bool:
    try:
        return docker.DockerClient(base_url=docker_host, timeout=5).ping()
    except docker.errors.DockerException:
        return False
