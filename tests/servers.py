"""Real servers for tests and the demo, each on a free loopback port with its own temporary state:
a Hub (olah serving local git repositories), an OCI registry (Debian's docker-registry) and Ollama.
The binaries come from scripts/bootstrap (its env file sets the *_BIN/CLI variables used here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import requests

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
def registry(root: Path, address: str = "") -> Iterator[str]:
    """Debian's docker-registry (CNCF distribution), no auth, deletes enabled. Yields 'host:port'.
    Started again with the same root and address, it serves what it stored before."""
    root.mkdir(parents=True, exist_ok=True)
    address = address or f"127.0.0.1:{free_port()}"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}\n")
    log = root / f"registry-{time.monotonic_ns()}.log"
    with _running([_tool("DOCKER_REGISTRY_BIN"), "serve", str(config)], log) as process:
        wait_until(lambda: requests.get(f"http://{address}/v2/", timeout=2).status_code == 200,
                   "docker-registry", process, log)
        yield address


def add_model_repo(mirrors: Path, repo_id: str, checkpoint: Path, tags: tuple[str, ...] = ()) -> Path:
    """Commit a checkpoint folder (with its subfolders) as a git repository in olah's mirror layout (branch main)."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    shutil.copytree(checkpoint, repo, dirs_exist_ok=True)
    git = ["git", "-C", str(repo), "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run(git[:3] + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", f"{repo_id} checkpoint"], check=True)
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
    namespace = run_dir.name  # apart from any other engine's, should they share a containerd
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
