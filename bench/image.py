"""python -m bench.image: what the action's image costs, measured in one run on this machine.

    bench/image [--no-cold] [--markdown FILE]

Builds the Dockerfile twice under a tag of its own: cold (no layer cache: every stage, Ollama and
llama.cpp included) and warm (every layer cached, as a rebuild after an edit of nothing), and prints
both times with their ratio, then the image's unpacked size (what the engine stores) and compressed
size (`docker save | gzip`, about what a registry transfers). The build arguments are scripts/bootstrap's
for this machine ($OLLAMA_PUBLISH_BUILD_ARGS). Cold builds take half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TAG = "ollama-publish:bench"


def build(no_cache: bool, log: Path) -> float:
    """Seconds `docker build` of the action's image takes (legacy builder, host network, bootstrap's args)."""
    args = shlex.split(os.environ.get("OLLAMA_PUBLISH_BUILD_ARGS", ""))
    command = ["docker", "build", "--network", "host", *args, *(["--no-cache"] if no_cache else []), "-t", TAG, "."]
    start = time.monotonic()
    with log.open("w") as out:
        subprocess.run(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return time.monotonic() - start


def unpacked_size(tag: str) -> int:
    return int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True,
                              check=True).stdout)


def compressed_size(tag: str) -> int:
    """Bytes of the image's layers gzip-compressed (level 6, as registries receive them), streamed."""
    total = 0

    class Counter:
        def write(self, data: bytes) -> None:
            nonlocal total
            total += len(data)

        def flush(self) -> None:
            pass

    with subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE) as save, \
            gzip.GzipFile(fileobj=Counter(), mode="wb", compresslevel=6) as packed:  # type: ignore[arg-type]
        assert save.stdout is not None
        while block := save.stdout.read(8 << 20):
            packed.write(block)
    return total


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/image", description=__doc__.splitlines()[0])
    parser.add_argument("--no-cold", action="store_true", help="skip the cold build (the image must exist then)")
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    args = parser.parse_args(argv)
    logs = Path(os.environ.get("OLLAMA_PUBLISH_CACHE") or Path.home() / ".cache" / "ollama-publish")
    rows = []
    cold = None
    if not args.no_cold:
        print("bench: cold build (no layer cache; about half an hour on 2 cores)", flush=True)
        cold = build(True, logs / "bench-image-cold.log")
    warm = build(False, logs / "bench-image-warm.log")
    if cold is not None:
        rows.append(("cold build (no layer cache)", f"{cold / 60:.1f} min"))
    rows.append(("warm build (every layer cached)", f"{warm:.1f} s" + (f" = {warm / cold:.4f} x cold" if cold else "")))
    unpacked, packed = unpacked_size(TAG), compressed_size(TAG)
    rows += [("image, unpacked", f"{unpacked / 1e9:.2f} GB"),
             ("image, compressed (gzip -6)", f"{packed / 1e9:.2f} GB = {packed / unpacked:.2f} x unpacked")]
    header = (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, build arguments: "
              f"{os.environ.get('OLLAMA_PUBLISH_BUILD_ARGS') or '(the Dockerfile defaults)'}")
    table = "\n".join([header, "", "| | |", "|---|---:|", *(f"| {name} | {value} |" for name, value in rows)])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    subprocess.run(["docker", "rmi", TAG], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
