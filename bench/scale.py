"""python -m bench.scale: the action at users' sizes on a runner-shaped box, beside the recipe by hand.

For each shape (bench/shapes.py: about 1B, 3B and 8B parameters), the checkpoint is served by the test Hub
(olah over a git repo, cached between runs). Then, one after the other, on the same machine:

- the recipe by hand (bench.recipes.baseline: snapshot_download, the converter to f16, llama-quantize per
  quantization, ollama create and push per tag), on the host's disk, when the host has room for it;
- the action, in its image, run the way GitHub's runner runs it (tests.container.Runner: its docker run,
  mounts and environment) under a memory limit (a hosted runner's 16 GB, no swap) with the runner's whole
  work folder (checkout and RUNNER_TEMP) on a filesystem of its own, as small as a runner's guaranteed free
  disk (14 GB by default): an ext4 image on a loop device.

Printed per shape: the wall time of each stage, peak disk and peak RSS (as ratios to the checkpoint S and
to the recipe), the checks' share of the run, and the bytes the Hub sent and the registry stored and sent.
Each run gets a registry of its own, deleted after it. See docs/benchmark.md.

    bench/run-scale [--shapes 3b,8b] [--quantizations Q4_K_M,Q8_0] [--disk-gb 14] [--memory-gb 16]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from bench import recipes, shapes
from bench.__main__ import checkpoint_size
from bench.sampler import process_table, tree
from tests import servers
from tests.container import IMAGE, Runner

GB = 1e9
SMOKE_PROMPT = "What is the capital of Germany?"


def cache_folder() -> Path:
    return Path(os.environ.get("OLLAMA_PUBLISH_CACHE") or Path.home() / ".cache" / "ollama-publish")


def hub_repo(hub_root: Path, mirrors: Path, shape: str) -> tuple[str, dict[str, int]]:
    """The shape's checkpoint as a repo of the cached Hub, built once: written, committed (git stores it),
    then the folder deleted (olah serves the commit's objects)."""
    small = Path(os.environ["SMOLLM2_CHECKPOINT"])
    key = hashlib.sha256((Path(__file__).parent / "shapes.py").read_bytes() + small.name.encode()).hexdigest()[:12]
    repo_id = f"bench/shape-{shape}-{key}"
    done = hub_root / f"{shape}-{key}.done"
    if not done.exists():
        shutil.rmtree(mirrors / "models" / repo_id, ignore_errors=True)
        folder = hub_root / f"build-{shape}"
        print(f"bench.scale: building the {shape} checkpoint (once; cached in {hub_root})", flush=True)
        shapes.build(small, folder, shape)
        servers.add_model_repo(mirrors, repo_id, folder, tags=(recipes.REVISION,))
        size = checkpoint_size(folder)
        shutil.rmtree(folder)
        done.write_text(json.dumps({"bytes": size, "parameters": shapes.parameters(shape)}))
    return repo_id, json.loads(done.read_text())


@contextlib.contextmanager
def capped_filesystem(path: Path, free_bytes: int) -> Iterator[Path]:
    """An ext4 filesystem with about `free_bytes` free (no reserved blocks), mounted at `path` for the block."""
    image = path.with_suffix(".img")
    path.mkdir(parents=True)
    with image.open("wb") as f:
        f.truncate(int(free_bytes * 1.02))  # sparse; ext4's own metadata takes about 1.6%
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()
        image.unlink()


class _CountedWrites:
    """A handler's output stream that counts what is written to it."""

    def __init__(self, raw: Any, counter: list[int]):
        self.raw, self.counter = raw, counter

    def write(self, data: bytes) -> int:
        self.counter[0] += len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@contextlib.contextmanager
def counting_front(upstream: str) -> Iterator[tuple[str, list[int]]]:
    """A front on loopback that relays every request to `upstream` and counts the bytes it sends back: what
    a run downloads from the Hub. Yields (its URL, [bytes sent so far])."""
    sent = [0]

    class Front(http.server.BaseHTTPRequestHandler):
        def _relay(self) -> None:
            self.wfile = _CountedWrites(self.wfile, sent)
            with contextlib.suppress(ConnectionError):  # the action hangs up once it has a file's header
                servers.forward(self, upstream)

        do_GET = do_HEAD = _relay

        def log_message(self, format: str, *args: object) -> None:
            pass

    with servers.loopback(Front) as port:
        yield f"http://127.0.0.1:{port}", sent


class ContainerSampler(threading.Thread):
    """Every `interval` seconds: bytes used on the box's filesystem, and the summed RSS and PSS of the
    container's processes (its first process and every descendant: Ollama, the tools, the model runners).
    RSS counts a file two processes map twice (two Ollamas' runners loading the same hard-linked model);
    PSS shares it out, so its sum is the memory the processes hold together."""

    def __init__(self, box: Path, interval: float = 0.5):
        super().__init__(daemon=True)
        self.box, self.interval = box, interval
        self.pid = 0
        self.baseline_used = self._used()
        self.samples: list[tuple[float, int, int, int]] = []  # time, disk, RSS, PSS
        self.stopping = threading.Event()

    def _used(self) -> int:
        stat = os.statvfs(self.box)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize

    def _memory(self) -> tuple[int, int]:
        table = process_table()
        rss = pss = 0
        for pid in (self.pid, *tree(self.pid, table, frozenset())):
            with contextlib.suppress(OSError, StopIteration, KeyError):
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                pss += next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
                rss += table[pid][1]
        return rss, pss

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic(), self._used() - self.baseline_used, *self._memory()))

    def peaks(self, start: float = 0.0, end: float = float("inf")) -> tuple[int, int, int]:
        """The peak disk, RSS and PSS sampled between start and end."""
        inside = [s for s in self.samples if start <= s[0] <= end] or [(0.0, 0, 0, 0)]
        return max(s[1] for s in inside), max(s[2] for s in inside), max(s[3] for s in inside)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


@dataclasses.dataclass
class Figures:
    variant: str
    total: float
    stages: dict[str, float]  # seconds, in the order they ran
    checks: float  # seconds of the stages that prove rather than produce
    peak_disk: int
    peak_rss: int
    hub_bytes: int
    registry_stored: int
    registry_sent: int
    outputs: dict[str, int]  # bytes of each quantization's GGUF
    note: str = ""
    peak_pss: int = 0  # the action's only (see ContainerSampler)
    stage_peaks: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # group: peak disk, PSS


def groups(lines: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """The action's log groups: (title, start, end)."""
    found, title, start = [], None, 0.0
    for t, text in lines:
        if text.startswith("::group::"):
            title, start = text.removeprefix("::group::"), t
        elif text.startswith("::endgroup::") and title is not None:
            found.append((title, start, t))
            title = None
    return found


def action_stages(lines: list[tuple[float, str]], t0: float, t1: float) -> tuple[dict[str, float], float]:
    """Seconds per group of the action's log, stage 5 split into creating and its checks (as
    bench.recipes.stages_from_log splits it), and the checks' seconds (parity, smoke test, pull-back)."""
    timeline = recipes.stages_from_log(lines, t0, t1)
    split = {name: end - start for name, start, end, _ in timeline.intervals}
    stages: dict[str, float] = {}
    for title, start, end in groups(lines):
        if title.startswith("5."):
            stages |= {"5. create": split.get("create", 0.0), "5. prompt parity": split.get("prompt parity", 0.0),
                       "5. smoke test": split.get("smoke test", 0.0)}
        else:
            stages[title] = end - start
    checks = sum(v for k, v in stages.items() if k.startswith(("5. prompt", "5. smoke", "7.")))
    return stages, checks


def run_action(variant: str, image: str, repo_id: str, hub_endpoint: str, registry: str, shape: str,
               quantizations: tuple[str, ...], root: Path, free_bytes: int, memory: int,
               hub_sent: list[int]) -> Figures:
    """The action's image run as the runner runs it, on a box; a run that fails keeps its figures and says why."""
    with capped_filesystem(root / "box", free_bytes) as box:
        print(f"bench.scale: {shape}: {variant} ({image}), {memory / 2**30:.0f} GiB of memory, "
              f"{shutil.disk_usage(box).free / GB:.2f} GB free on its filesystem", flush=True)
        sampler = ContainerSampler(box)
        runner = Runner(box, image=image, memory_limit=memory)
        lines: list[tuple[float, str]] = []
        log = root / f"{shape}-{variant.split()[0]}.log"

        def on_line(line: str, container) -> None:
            if not lines:
                container.reload()
                sampler.pid = container.attrs["State"]["Pid"]
                sampler.start()
            lines.append((time.monotonic(), line))

        hub0, served0 = hub_sent[0], sum(servers.SERVED_BYTES.values())
        t0 = time.monotonic()
        run = runner.run({"hf-repo": repo_id, "hf-revision": recipes.REVISION,
                          "ollama-model": f"{registry}/bench/scale-{shape}", "insecure-registry": "true",
                          "quantizations": ", ".join(quantizations), "smoke-test-prompt": SMOKE_PROMPT},
                         env={"HF_ENDPOINT": hub_endpoint}, on_line=on_line)
        t1 = time.monotonic()
        sampler.stop()
        log.write_text(run.stdout + "\n--- stderr ---\n" + run.stderr)
        failed = "" if run.exit_code == 0 else next(
            (line for line in run.stdout.splitlines() if line.startswith("::error")), f"exit code {run.exit_code}")
        if failed:
            print(f"bench.scale: {shape}: {variant} failed (log: {log}): {failed}", flush=True)
        models = json.loads(next((line.split("=", 1)[1] for line in run.outputs_text.splitlines()
                                  if line.startswith("models=")), "[]"))
        stages, checks = action_stages(lines, t0, t1)
        peak_disk, peak_rss, peak_pss = sampler.peaks()
        stage_peaks = {title: sampler.peaks(start, end)[::2] for title, start, end in groups(lines)}
        return Figures(variant, t1 - t0, stages, checks, peak_disk, peak_rss,
                       hub_sent[0] - hub0, 0, sum(servers.SERVED_BYTES.values()) - served0,
                       {m["quantization"]: m["size"] for m in models}, note=failed, peak_pss=peak_pss,
                       stage_peaks=stage_peaks)


def run_recipe(repo_id: str, hub_endpoint: str, registry: str, shape: str, quantizations: tuple[str, ...],
               root: Path, hub_sent: list[int]) -> Figures:
    setup = recipes.Setup(hub_endpoint=hub_endpoint, registry=registry, quantizations=quantizations, interval=0.5,
                          exclude=frozenset(pid for pid, (ppid, *_) in process_table().items() if ppid == os.getpid()))
    run_dir = root / f"{shape}-recipe"
    run_dir.mkdir()
    hub0, served0 = hub_sent[0], sum(servers.SERVED_BYTES.values())
    result = recipes.baseline(setup, repo_id, f"bench/recipe-{shape}", run_dir, root / f"{shape}-recipe.log", 1, shape)
    stages = {name: stat.seconds for name, stat in result.stages.items()}
    return Figures("recipe", result.total, stages, 0.0, result.peak_disk, result.peak_rss,
                   hub_sent[0] - hub0, 0, sum(servers.SERVED_BYTES.values()) - served0,
                   {q: result.files[q] for q in quantizations})


def table(shape: str, size: int, parameters: int, runs: list[Figures], free_bytes: int, memory: int) -> str:
    recipe = next((r for r in runs if r.variant == "recipe"), None)
    out = [f"### {shape}: {parameters / 1e9:.2f}B parameters, S = {size / GB:.2f} GB (bf16)", "",
           "| | " + " | ".join(r.variant for r in runs) + " |", "|---|" + "---:|" * len(runs)]

    def row(label: str, values: list[str]) -> None:
        out.append(f"| {label} | " + " | ".join(values) + " |")

    def vs(value: float, base: float | None) -> str:
        return f" ({value / base:.2f} of the recipe)" if base else ""

    if any(r.note for r in runs):
        row("failed", [r.note.split("::", 2)[-1][:300] if r.note else "no" for r in runs])
    row("wall time", [f"{r.total:,.0f} s" + vs(r.total, recipe.total if recipe and r is not recipe else None)
                      for r in runs])
    row("peak disk", [f"{r.peak_disk / GB:.2f} GB = {r.peak_disk / size:.2f} S"
                      + vs(r.peak_disk, recipe.peak_disk if recipe and r is not recipe else None) for r in runs])
    row("outputs ΣQ", [f"{sum(r.outputs.values()) / GB:.2f} GB" for r in runs])
    row("peak disk / (ΣQ + largest Q)", [f"{r.peak_disk / (sum(r.outputs.values()) + max(r.outputs.values())):.2f}"
                                         if r.outputs else "–" for r in runs])
    row("peak RSS (summed over processes)", [f"{r.peak_rss / GB:.2f} GB" for r in runs])
    row("peak PSS (the action's processes together)", [f"{r.peak_pss / GB:.2f} GB" if r.peak_pss else "–"
                                                       for r in runs])
    row("the checks' share", [f"{r.checks / r.total:.1%}" if r.variant == "action" else "–" for r in runs])
    row("bytes from the Hub", [f"{r.hub_bytes / GB:.2f} GB = {r.hub_bytes / size:.2f} S" for r in runs])
    row("bytes the registry stored (pushed)", [f"{r.registry_stored / GB:.2f} GB" for r in runs])
    row("bytes the registry sent (pulls)", [f"{r.registry_sent / 1e6:.1f} MB" for r in runs])
    out += ["", "Stages (seconds):", ""]
    for r in runs:
        out.append(f"- {r.variant}: " + ", ".join(f"{k} {v:,.0f}" for k, v in r.stages.items() if v >= 0.5))
    for r in runs:
        if r.stage_peaks:
            peaks = (f"{title.split(' ', 1)[0]} {disk / GB:.2f} / {pss / GB:.2f}"
                     for title, (disk, pss) in r.stage_peaks.items())
            out += ["", f"{r.variant}, peak disk / PSS by stage (GB): " + ", ".join(peaks)]
    out += ["", f"The action ran in its image with {memory / 2**30:.0f} GiB of memory and {free_bytes / GB:.0f} GB "
            "of free disk; the recipe on the host's disk."]
    if any(r.variant == "before" for r in runs):
        out += ["'before' is the action as it was before the weights streamed (its image built from an earlier "
                "commit), with the same memory limit."]
    return "\n".join(out)


def _save(root: Path, shape: str, figures: Figures) -> None:
    """Each run's figures, as soon as it ends: a later failure keeps them."""
    with (root / "figures.jsonl").open("a") as saved:
        saved.write(json.dumps({"shape": shape, **dataclasses.asdict(figures)}) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run-scale", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="3b,8b", help="of bench/shapes.py (default 3b,8b)")
    parser.add_argument("--quantizations", default="Q4_K_M, Q8_0")
    parser.add_argument("--disk-gb", type=float, default=14, help="free disk of the action's box (default 14)")
    parser.add_argument("--memory-gb", type=float, default=16, help="the action's memory limit in GiB (default 16)")
    parser.add_argument("--no-recipe", action="store_true", help="run the action only")
    parser.add_argument("--before-image", metavar="IMAGE",
                        help="also run this image of the action as it was before (e.g. built from 3b1db95, which "
                             "converted through a 16-bit file) with the same limits")
    parser.add_argument("--before-disk-gb", type=float, help="free disk of its box (default: --disk-gb)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    quantizations = tuple(q.strip().upper() for q in args.quantizations.split(",") if q.strip())
    free_bytes, memory = int(args.disk_gb * GB), int(args.memory_gb * 2**30)
    hub_root = cache_folder() / "bench-hub"
    root = Path(tempfile.mkdtemp(prefix="ollama-publish-scale-"))
    texts = []
    with servers.hub(hub_root) as (olah, mirrors), counting_front(olah) as (endpoint, hub_sent):
        for shape in (s.strip() for s in args.shapes.split(",")):
            repo_id, facts = hub_repo(hub_root, mirrors, shape)
            runs = []
            # The recipe keeps S + F + ΣQ + ΣQ: about 2.6 S for Q4_K_M and Q8_0.
            if not args.no_recipe:
                need = 2 * facts["bytes"] * (1 + len(quantizations) * 0.5)
                if shutil.disk_usage(root).free > need * 1.1:
                    with servers.registry(root / "registry-recipe") as registry:
                        runs.append(run_recipe(repo_id, endpoint, registry, shape, quantizations, root, hub_sent))
                        runs[-1].registry_stored = recipes.allocated(root / "registry-recipe" / "data")
                    shutil.rmtree(root / "registry-recipe")
                    shutil.rmtree(root / f"{shape}-recipe", ignore_errors=True)
                    _save(root, shape, runs[-1])
                else:
                    print(f"bench.scale: {shape}: no room for the recipe by hand (about {need / GB:.0f} GB)",
                          flush=True)
            actions = [("action", IMAGE, free_bytes)]
            if args.before_image:
                actions.insert(0, ("before", args.before_image, int((args.before_disk_gb or args.disk_gb) * GB)))
            for variant, image, box_bytes in actions:
                with servers.registry(root / "registry-action") as registry:
                    runs.append(run_action(variant, image, repo_id, endpoint, registry, shape, quantizations, root,
                                           box_bytes, memory, hub_sent))
                    runs[-1].registry_stored = recipes.allocated(root / "registry-action" / "data")
                shutil.rmtree(root / "registry-action")
                _save(root, shape, runs[-1])
            text = table(shape, facts["bytes"], facts["parameters"], runs, free_bytes, memory)
            print("\n" + text + "\n", flush=True)
            texts.append(text)
            (root / "results.md").write_text("\n\n".join(texts))
    if args.markdown:
        args.markdown.write_text("\n\n".join(texts) + "\n")
    print(f"bench.scale: logs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
