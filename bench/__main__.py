"""python -m bench: the action against the by-hand recipe, alternating, on a real Hub, registry and Ollama.

See docs/benchmark.md. Every run starts from nothing (its own Hub cache, work dir, Ollama models dir and
registry repository); the Hub (olah) and the registry are shared by all runs and not counted in them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import recipes, report
from bench.recipes import REPO_ROOT, RunResult, Setup, StageStat
from bench.sampler import process_table, wait_for_quiet
from tests import servers

SMALL = "SmolLM2-135M"


def parameter_count(checkpoint: Path) -> int:
    """Parameters in a checkpoint's safetensors files, from their headers."""
    total = 0
    for path in sorted(checkpoint.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def checkpoint_size(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file())


def big_checkpoint(small: Path, layers: int) -> Path:
    """The larger random-weight checkpoint, built once and cached next to bootstrap's tools."""
    cache = Path(os.environ.get("OLLAMA_PUBLISH_CACHE") or Path.home() / ".cache" / "ollama-publish")
    key = hashlib.sha256((Path(__file__).parent / "bigmodel.py").read_bytes() + small.name.encode()).hexdigest()[:12]
    target = cache / f"bench-smollm2-{layers}-layers-{key}"
    if not (target / "model.safetensors").is_file():
        print(f"bench: building the larger checkpoint ({layers} layers) in {target}", flush=True)
        subprocess.run([sys.executable, "-m", "bench.bigmodel", str(small), str(target), "--layers", str(layers)],
                       check=True, cwd=REPO_ROOT)
    return target


def _command_output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "?"


def export_action(ref: str, root: Path) -> tuple[Path, str]:
    """The action's code to run: a commit exported with git archive (other people may be editing the
    working tree meanwhile), or the working tree itself."""
    if ref == "worktree":
        dirty = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "entrypoint", "templates"])
        head = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
        return REPO_ROOT, f"working tree at {head}" + (" with uncommitted changes in entrypoint/" if dirty else "")
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    target = root / "action"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit, "entrypoint", "templates"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    changed = _command_output(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h", commit, "--",
                               "entrypoint", "templates"])
    return target, f"commit {commit[:7]} (entrypoint/ last changed in {changed})"


def machine_header(args: argparse.Namespace, root: Path, action: str) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    fs = _command_output(["df", "--output=fstype,source", str(root)]).splitlines()[-1:]
    ollama = _command_output([os.environ["OLLAMA_BIN"], "--version"]).split()[-1:]
    return [
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. The action: {action}.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, runs on "
        f"{' '.join(fs[0].split()) if fs else '?'}; Linux {platform.release()}, Python {platform.python_version()}; "
        f"Ollama {ollama[0] if ollama else '?'}; llama.cpp {Path(os.environ['LLAMA_CPP_DIR']).name}.",
        "",
        f"Quantizations {', '.join(args.quantizations)}; release tag {recipes.REVISION} (5 tags: one per "
        "quantization, the version and latest); disk and RSS sampled every "
        f"{args.interval:g} s.",
    ]


def load_runs(path: Path) -> tuple[list[RunResult], dict]:
    data = json.loads(path.read_text())
    runs = []
    for raw in data["runs"]:
        raw["stages"] = {k: StageStat(**v) for k, v in raw["stages"].items()}
        runs.append(RunResult(**raw))
    return runs, data


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant on SmolLM2-135M (default 3)")
    parser.add_argument("--big-runs", type=int, default=2,
                        help="runs of each on the ~3x larger model (default 2; 0 skips it)")
    parser.add_argument("--big-layers", type=int, default=106, help="layers of the larger model (SmolLM2-135M has 30)")
    parser.add_argument("--quantizations", default="Q4_K_M, Q5_K_M, Q8_0")
    parser.add_argument("--interval", type=float, default=0.1, help="sampling interval in seconds (default 0.1)")
    parser.add_argument("--checks-off-input", action="append", default=[], metavar="NAME=VALUE",
                        help="an action input that switches the checks off, e.g. smoke-test=off and "
                             "prompt-parity=off; when given, a third variant 'ours, checks off' runs with them")
    parser.add_argument("--markdown", type=Path, help="write the final table as markdown to this file")
    parser.add_argument("--json", type=Path, help="write every run's figures as JSON to this file")
    parser.add_argument("--report-only", type=Path, metavar="JSON",
                        help="print the table from a --json file, run nothing")
    parser.add_argument("--action", default="HEAD", metavar="REF",
                        help="the commit of the action to run (default HEAD, exported with git archive), or "
                             "'worktree' for the working tree as it is")
    parser.add_argument("--quiet-below", type=float, default=0.5, metavar="CORES",
                        help="before each run, wait until other processes use fewer cores than this (default 0.5)")
    parser.add_argument("--quiet-timeout", type=float, default=120, metavar="SECONDS",
                        help="wait at most this long for that, then run anyway (default 120)")
    parser.add_argument("--workdir", type=Path, help="where runs happen (default: a new folder in $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep every run's folders (default: logs only)")
    args = parser.parse_args(argv)
    args.quantizations = tuple(q.strip().upper() for q in args.quantizations.replace("\n", ",").split(",") if q.strip())

    if args.report_only:
        runs, data = load_runs(args.report_only)
        text = report.markdown(runs, data["header"], data["models"], data["params"], data["checkpoint_bytes"],
                               data["checks_off"], data["quantizations"])
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return 0

    checks_off = dict(item.split("=", 1) for item in args.checks_off_input)
    small = Path(os.environ["SMOLLM2_CHECKPOINT"])
    checkpoints = {SMALL: small}
    if args.big_runs > 0:
        big = big_checkpoint(small, args.big_layers)
        checkpoints[f"SmolLM2-{args.big_layers}-layers"] = big
    plan = {name: (args.runs if name == SMALL else args.big_runs) for name in checkpoints}
    params = {name: parameter_count(path) for name, path in checkpoints.items()}
    sizes = {name: checkpoint_size(path) for name, path in checkpoints.items()}
    root = Path(tempfile.mkdtemp(prefix="ollama-publish-bench-", dir=args.workdir))
    logs = root / "logs"
    logs.mkdir()
    print(f"bench: working in {root}", flush=True)
    action_root, action = export_action(args.action, root)
    header = machine_header(args, root, action)
    if checks_off:
        header += ["", "'ours, checks off' is the action run with inputs "
                   + ", ".join(f"`{k}: {v}`" for k, v in checks_off.items()) + "."]
    variants = ["baseline", "ours"] + (["ours, checks off"] if checks_off else [])
    runs: list[RunResult] = []

    def save(path: Path) -> None:  # after every run, so a failure later keeps the figures so far
        path.write_text(json.dumps({
            "header": header, "models": list(checkpoints), "params": params, "checkpoint_bytes": sizes,
            "checks_off": bool(checks_off), "quantizations": list(args.quantizations),
            "runs": [dataclasses.asdict(r) for r in runs]}, indent=1))

    with servers.hub(root / "hub") as (endpoint, mirrors), servers.registry(root / "registry") as registry:
        for name, path in checkpoints.items():
            servers.add_model_repo(mirrors, f"bench/{name.lower()}", path, tags=(recipes.REVISION,))
        shared = frozenset(pid for pid, (ppid, *_) in process_table().items() if ppid == os.getpid())
        setup = Setup(hub_endpoint=endpoint, registry=registry, quantizations=args.quantizations,
                      interval=args.interval, exclude=shared, action_root=action_root)
        for name in checkpoints:
            for index in range(1, plan[name] + 1):
                order = variants if index % 2 else variants[::-1]  # alternate which goes first
                for variant in order:
                    slug = {"baseline": "base", "ours": "ours"}.get(variant, "off")
                    label = f"{name.lower()}-{slug}-{index}"
                    run_dir = root / "runs" / label
                    run_dir.mkdir(parents=True)
                    hf_repo, repository, log = f"bench/{name.lower()}", f"bench/{label}", logs / f"{label}.log"
                    wait_for_quiet(args.quiet_below, args.quiet_timeout, lambda m: print(f"bench: {m}", flush=True))
                    if variant == "baseline":
                        result = recipes.baseline(setup, hf_repo, repository, run_dir, log, index, name)
                    else:
                        result = recipes.ours(setup, hf_repo, repository, run_dir, log, index, name, variant,
                                              checks_off if variant != "ours" else None)
                    runs.append(result)
                    save(logs / "results.json")
                    print(f"bench: {name} run {index}/{plan[name]} {variant:>16}: {result.total:6.1f} s, "
                          f"peak disk {result.peak_disk / 1e6:7,.0f} MB, peak RSS {result.peak_rss / 1e6:6,.0f} MB, "
                          f"CPU {result.cpu:6.1f} s, others' load {result.foreign_load:.2f} cores",
                          flush=True)
                    if not args.keep:
                        shutil.rmtree(run_dir)
    text = report.markdown(runs, header, list(checkpoints), params, sizes, bool(checks_off), list(args.quantizations))
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        save(args.json)
    if not args.keep:
        for item in root.iterdir():
            if item != logs:
                shutil.rmtree(item, ignore_errors=True)
    print(f"bench: logs in {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
