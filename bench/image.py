"""python -m bench.image: what the action's image costs a user's job, measured in one run on this machine.

    bench/image [--markdown FILE]

A hosted runner starts every job with an empty image store. Both ways a job can get the image are
measured in a Docker engine of their own with an empty store (tests/servers.docker_engine), from the
moment the job asks for the image to the action's first stage (its "1. Start Ollama" line):

  built   `docker build` of the Dockerfile, as `image: Dockerfile` makes the runner do (the base image
          is loaded into the engine first; on GitHub it is pulled), then the container;
  pulled  `docker pull` of the same image from a registry (here Debian's docker-registry on loopback,
          which the image was pushed to beforehand), then the container.

For each: the time, the ratio pulled / built (the target is below 0.2), and the disk the engine holds by
then (its data root: layers, and for the build its intermediate images). Also the image's unpacked size,
its compressed size (the registry's layer sizes: what a pull transfers), and a warm build in the main
engine (every layer cached). Builds go through scripts/build-image, as scripts/bootstrap's do. The cold
build takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import requests

from tests import servers

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGE_1 = "::group::1. Start Ollama"
INPUTS = {"INPUT_HF-REPO": "bench/none", "INPUT_OLLAMA-MODEL": "127.0.0.1:9/bench/none", "INPUT_PUSH": "false"}


def build(docker_host: str, tag: str, log: Path) -> float:
    """Seconds scripts/build-image takes to build the action's image in the engine at `docker_host`."""
    start = time.monotonic()
    with log.open("w") as out:
        subprocess.run([str(REPO_ROOT / "scripts" / "build-image"), tag], stdout=out, stderr=subprocess.STDOUT,
                       check=True, env={**os.environ, "DOCKER_HOST": docker_host})
    return time.monotonic() - start


def until_stage_1(client: docker.DockerClient, image: str) -> float:
    """Seconds from `docker run` to the action's first stage line; the container is removed then."""
    start = time.monotonic()
    container = client.containers.run(image, detach=True, network_mode="host", working_dir="/github/workspace",
                                      environment={**INPUTS, "OLLAMA_HOST": f"127.0.0.1:{servers.free_port()}"})
    try:
        pending = b""
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
            pending += chunk
            if STAGE_1.encode() in pending:
                return time.monotonic() - start
        raise RuntimeError(f"the action never reached stage 1: {pending[-2000:]!r}")
    finally:
        container.remove(force=True)


def disk_used(data_root: Path) -> int:
    return int(subprocess.run(["du", "-sbx", str(data_root)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def compressed_size(registry: str, repository: str, tag: str) -> int:
    manifest = requests.get(f"http://{registry}/v2/{repository}/manifests/{tag}", timeout=30, headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()
    return sum(layer["size"] for layer in manifest["layers"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/image", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    image = os.environ.get("OLLAMA_PUBLISH_IMAGE", "ollama-publish:local")
    main_engine = os.environ["DOCKER_HOST"]
    local = docker.DockerClient(base_url=main_engine, timeout=3600)
    root = Path(tempfile.mkdtemp(prefix="ollama-publish-bench-image-"))
    warm = build(main_engine, image, root / "warm-build.log")
    unpacked = int(local.images.get(image).attrs["Size"])
    base = subprocess.run([str(REPO_ROOT / "scripts" / "build-image"), "--base"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with servers.registry(root / "registry") as registry:
        remote = f"{registry}/ollama-publish/action:bench"
        local.images.get(image).tag(remote)
        print(f"bench: pushing {image} to {registry}", flush=True)
        for line in local.images.push(remote, stream=True, decode=True):
            if "error" in line:
                raise RuntimeError(line["error"])
        local.images.remove(remote)
        packed = compressed_size(registry, "ollama-publish/action", "bench")

        print("bench: pulled: pull into an empty engine, run to stage 1", flush=True)
        with servers.docker_engine(root / "pulled") as engine:
            client = docker.DockerClient(base_url=engine, timeout=3600)
            start = time.monotonic()
            client.images.pull(remote)
            pulled = time.monotonic() - start + until_stage_1(client, remote)
            pulled_disk = disk_used(root / "pulled" / "data")

    print("bench: built: build in an empty engine (no layer cache), run to stage 1; a quarter of an hour or more",
          flush=True)
    with servers.docker_engine(root / "built") as engine:
        client = docker.DockerClient(base_url=engine, timeout=3600)
        start = time.monotonic()
        client.images.load(local.images.get(base).save(named=True))  # named: keep its tag
        build(engine, "ollama-publish:bench", root / "cold-build.log")
        built = time.monotonic() - start + until_stage_1(client, "ollama-publish:bench")
        built_disk = disk_used(root / "built" / "data")

    rows = [
        ("job start to stage 1, image pulled", f"{pulled:.0f} s"),
        ("job start to stage 1, image built from the Dockerfile", f"{built / 60:.1f} min"),
        ("pulled / built", f"{pulled / built:.3f} (target < 0.2)"),
        ("disk used before stage 1, pulled", f"{pulled_disk / 1e9:.2f} GB"),
        ("disk used before stage 1, built", f"{built_disk / 1e9:.2f} GB"),
        ("image, unpacked", f"{unpacked / 1e9:.2f} GB"),
        ("image, compressed (its layers in the registry)", f"{packed / 1e9:.2f} GB"),
        ("warm build (every layer cached)", f"{warm:.1f} s"),
    ]
    header = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, base image {base}"
    table = "\n".join([header, "", "| | |", "|---|---:|", *(f"| {name} | {value} |" for name, value in rows)])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
