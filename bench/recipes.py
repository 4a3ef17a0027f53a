"""The two ways of doing the same job, each timed per stage while a Sampler watches it.

baseline: the recipe users follow by hand, one tool call after another (snapshot_download of the whole
repo into the Hub cache, convert_hf_to_gguf.py --outtype f16, llama-quantize per quantization,
`ollama create -f Modelfile` per tag, `ollama push --insecure` per tag) against an Ollama server started
for the run (tests.servers.ollama, counted in the run's time, disk and memory like the action's own).

ours: `python -m entrypoint`, given its inputs as INPUT_* variables the way GitHub gives them; it starts
its own Ollama server. Its stages are read off the `::group::` lines it prints, timestamped as they
stream; inside groups, its log lines split conversion from quantization and creation from the checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from bench.sampler import Sample, Sampler, machine_busy
from entrypoint.quantize import tag_suffix
from tests import servers

REPO_ROOT = Path(__file__).resolve().parent.parent
REVISION = "v1.0.0"
VERSION = "1.0.0"
STAGES = ("setup", "start ollama", "download", "convert", "quantize", "create", "prompt parity", "smoke test",
          "push", "teardown", "other")
CHECK_STAGES = ("prompt parity", "smoke test")
# A ChatML template as people copy it into a Modelfile by hand for SmolLM2.
CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')
DOWNLOAD = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download(sys.argv[1], revision=sys.argv[2]))")


@dataclasses.dataclass
class Setup:
    hub_endpoint: str
    registry: str
    quantizations: tuple[str, ...]
    interval: float
    exclude: frozenset[int]  # pids of the shared servers (Hub, registry): not part of any run
    action_root: Path = REPO_ROOT  # where `python -m entrypoint` is imported from


@dataclasses.dataclass
class StageStat:
    seconds: float
    peak_disk: int
    peak_rss: int
    cpu: float = 0.0  # CPU seconds (user+sys) of the run's processes during the stage
    peak_rss_without_runner: int = 0  # the same peak leaving out Ollama's model runners (loaded by the checks)


@dataclasses.dataclass
class RunResult:
    variant: str
    model: str
    index: int
    total: float
    peak_disk: int
    peak_rss: int
    peak_disk_parts: dict[str, int]
    stages: dict[str, StageStat]
    peak_rss_parts: dict[str, int] = dataclasses.field(default_factory=dict)  # RSS per kind of process at the peak
    files: dict[str, int] = dataclasses.field(default_factory=dict)  # bytes on disk of the checkpoint and each GGUF
    cpu: float = 0.0  # CPU seconds (user+sys) of every process of the run
    machine_cpu: float = 0.0  # CPU seconds the whole machine used meanwhile
    shared_cpu: float = 0.0  # of which the shared Hub and registry serving this run (not counted in cpu)

    @property
    def foreign_load(self) -> float:
        """Cores busy with other people's work (not this run's, nor the Hub's and registry's), on average."""
        return max(0.0, self.machine_cpu - self.cpu - self.shared_cpu) / self.total if self.total else 0.0

    def without_checks(self) -> RunResult:
        """The same run with its check stages taken out: the 'same work' as the baseline."""
        # After the checks, the model runner they loaded stays in memory (Ollama's keep-alive): leave it out.
        after = STAGES.index(CHECK_STAGES[0])
        kept = {k: v if STAGES.index(k) < after else dataclasses.replace(v, peak_rss=v.peak_rss_without_runner)
                for k, v in self.stages.items() if k not in CHECK_STAGES}
        return RunResult(variant=self.variant + " minus checks", model=self.model, index=self.index,
                         total=self.total - sum(s.seconds for k, s in self.stages.items() if k in CHECK_STAGES),
                         peak_disk=max(s.peak_disk for s in kept.values()),
                         peak_rss=max(s.peak_rss for s in kept.values()),
                         peak_disk_parts=self.peak_disk_parts, stages=kept,
                         cpu=self.cpu - sum(s.cpu for k, s in self.stages.items() if k in CHECK_STAGES),
                         machine_cpu=self.machine_cpu, shared_cpu=self.shared_cpu)


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Timeline:
    """Stages as (name, start, end, CPU seconds or None when the samples must tell)."""

    def __init__(self) -> None:
        self.intervals: list[tuple[str, float, float, float | None]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A stage whose processes all end within it (their CPU is then counted exactly)."""
        start, cpu = time.monotonic(), children_cpu()
        try:
            yield
        finally:
            self.intervals.append((name, start, time.monotonic(), children_cpu() - cpu))

    def add(self, name: str, start: float, end: float, cpu: float | None = None) -> None:
        if end > start:
            self.intervals.append((name, start, end, cpu))


def release_tags(quantizations: tuple[str, ...]) -> list[tuple[str, str]]:
    """(quantization, tag) as the action makes them for a release tag by default, in push order."""
    tags = [(q, f"{VERSION}-{tag_suffix(q)}") for q in quantizations]
    return tags + [(quantizations[0], VERSION), (quantizations[0], "latest")]


def registry_tags(registry: str, repository: str) -> list[str]:
    response = requests.get(f"http://{registry}/v2/{repository}/tags/list", timeout=10)
    return [] if response.status_code == 404 else sorted(response.json().get("tags") or [])


def summarize(variant: str, model: str, index: int, timeline: Timeline, samples: list[Sample], t0: float,
              t1: float, cpu: float, machine_cpu: float) -> RunResult:
    def window(start: float, end: float) -> list[Sample]:
        inside = [s for s in samples if start <= s.t <= end]
        if not inside:  # shorter than the sampling interval: the next sample is the nearest
            inside = [s for s in samples if s.t >= start][:1]
        return inside

    def cpu_at(t: float) -> float:  # the tree's CPU so far, from the last sample before t
        before = [s for s in samples if s.t <= t]
        return (before[-1] if before else samples[0]).cpu

    stages: dict[str, StageStat] = {}
    for name, start, end, stage_cpu in timeline.intervals:
        found = window(start, end)
        old = stages.get(name, StageStat(0.0, 0, 0))
        used = stage_cpu if stage_cpu is not None else max(0.0, cpu_at(end) - cpu_at(start))
        stages[name] = StageStat(old.seconds + end - start, max([old.peak_disk] + [s.disk for s in found]),
                                 max([old.peak_rss] + [s.rss for s in found]), old.cpu + used,
                                 max([old.peak_rss_without_runner] + [s.rss - s.runner_rss for s in found]))
    other = (t1 - t0) - sum(s.seconds for s in stages.values())
    if other > 0.0005:
        stages["other"] = StageStat(other, 0, 0, max(0.0, cpu - sum(s.cpu for s in stages.values())))
    run_samples = window(t0, t1)
    top = max(run_samples, key=lambda s: s.disk)
    top_rss = max(run_samples, key=lambda s: s.rss)
    return RunResult(variant=variant, model=model, index=index, total=t1 - t0, peak_disk=top.disk,
                     peak_rss=top_rss.rss, peak_disk_parts=dict(top.disk_by_part),
                     peak_rss_parts=dict(top_rss.rss_by_process),
                     stages={k: stages[k] for k in STAGES if k in stages}, cpu=cpu, machine_cpu=machine_cpu,
                     shared_cpu=max(0.0, run_samples[-1].shared_cpu - run_samples[0].shared_cpu))


def _tool_env(run_dir: Path, setup: Setup) -> dict[str, str]:
    """What every tool of a run sees: its own HOME (Ollama's models), Hub cache and TMPDIR, all in run_dir."""
    keep = ("PATH", "LANG", "LC_ALL", "LLAMA_CPP_DIR", "LLAMA_QUANTIZE", "OLLAMA_BIN", "SSL_CERT_FILE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"HOME": str(run_dir / "home"), "HF_HOME": str(run_dir / "hf"), "TMPDIR": str(run_dir / "tmp"),
                "HF_ENDPOINT": setup.hub_endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                # The local Hub (olah) reads a large file out of git before its first byte: more than the
                # Hub client's default 10 s on a busy machine. Both ways get the same, longer timeouts.
                "HF_HUB_DOWNLOAD_TIMEOUT": "300", "HF_HUB_ETAG_TIMEOUT": "300"})
    for name in ("home", "hf", "tmp"):
        (run_dir / name).mkdir(parents=True, exist_ok=True)
    return env


def _run(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> str:
    """Run a tool to completion, its output appended to log; return its stdout."""
    proc = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    with log.open("a") as f:
        f.write(f"$ {' '.join(command)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} exited with {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc.stdout


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set variables in this process for the servers it starts (tests.servers copies os.environ)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def baseline(setup: Setup, hf_repo: str, repository: str, run_dir: Path, log: Path, index: int,
             model: str) -> RunResult:
    env = _tool_env(run_dir, setup)
    work = run_dir / "work"
    work.mkdir()
    name = f"{setup.registry}/{repository}"
    f16 = work / "model-f16.gguf"
    timeline = Timeline()
    sampler = Sampler(run_dir, setup.exclude, setup.interval)
    sampler.start()
    t0, cpu0, machine0 = time.monotonic(), children_cpu(), machine_busy()
    with contextlib.ExitStack() as stack:
        with timeline.stage("start ollama"), _environ(TMPDIR=env["TMPDIR"]):
            url = stack.enter_context(servers.ollama(run_dir / "home"))
        env["OLLAMA_HOST"] = url.removeprefix("http://")
        with timeline.stage("download"):
            snapshot = _run([sys.executable, "-c", DOWNLOAD, hf_repo, REVISION], log, env).strip().splitlines()[-1]
        with timeline.stage("convert"):
            _run([sys.executable, str(Path(env["LLAMA_CPP_DIR"]) / "convert_hf_to_gguf.py"), snapshot,
                  "--outtype", "f16", "--outfile", str(f16)], log, env)
        with timeline.stage("quantize"):
            for quant in setup.quantizations:
                _run([env["LLAMA_QUANTIZE"], str(f16), str(work / f"model-{quant}.gguf"), quant], log, env)
        with timeline.stage("create"):
            for quant in setup.quantizations:
                (work / f"Modelfile.{quant}").write_text(
                    f'FROM ./model-{quant}.gguf\nTEMPLATE """{CHATML}"""\nPARAMETER stop "<|im_end|>"\n')
            for quant, tag in release_tags(setup.quantizations):
                _run([env["OLLAMA_BIN"], "create", f"{name}:{tag}", "-f", f"Modelfile.{quant}"], log, env, cwd=work)
        with timeline.stage("push"):
            for _, tag in release_tags(setup.quantizations):
                _run([env["OLLAMA_BIN"], "push", "--insecure", f"{name}:{tag}"], log, env)
        teardown, teardown_cpu = time.monotonic(), children_cpu()
    t1, cpu1, machine1 = time.monotonic(), children_cpu(), machine_busy()
    timeline.add("teardown", teardown, t1, cpu1 - teardown_cpu)
    samples = sampler.stop()
    _verify(setup, repository)
    result = summarize("baseline", model, index, timeline, samples, t0, t1, cpu1 - cpu0, machine1 - machine0)
    result.files = {"checkpoint": allocated(run_dir / "hf" / "hub"), "F16": allocated(f16),
                    **{q: allocated(work / f"model-{q}.gguf") for q in setup.quantizations}}
    return result


def ours(setup: Setup, hf_repo: str, repository: str, run_dir: Path, log: Path, index: int, model: str,
         variant: str = "ours", inputs: dict[str, str] | None = None) -> RunResult:
    env = _tool_env(run_dir, setup)
    workspace, runner_temp = run_dir / "workspace", run_dir / "runner_temp"
    workspace.mkdir()
    runner_temp.mkdir()
    env.update({
        "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(workspace), "GITHUB_REF_NAME": REVISION,
        "GITHUB_REF_TYPE": "tag", "GITHUB_REPOSITORY": "bench/model-releases", "RUNNER_TEMP": str(runner_temp),
        "GITHUB_OUTPUT": str(log.with_suffix(".outputs")), "GITHUB_STEP_SUMMARY": str(log.with_suffix(".summary.md")),
        "OLLAMA_HOST": f"127.0.0.1:{servers.free_port()}", "PYTHONPATH": str(setup.action_root),
    })
    # The tests' smoke-test question: SmolLM2 at Q4_K_M loops on the default one on Ollama 0.34 (tests/conftest.py).
    values = {"hf-repo": hf_repo, "hf-revision": REVISION, "ollama-model": f"{setup.registry}/{repository}",
              "quantizations": ", ".join(setup.quantizations), "insecure-registry": "true",
              "smoke-test-prompt": "What is the capital of Germany?", **(inputs or {})}
    env.update({f"INPUT_{k.upper()}": v for k, v in values.items()})
    lines: list[tuple[float, str]] = []
    sampler = Sampler(run_dir, setup.exclude, setup.interval)
    sampler.start()
    keeper = _LogKeeper(run_dir, log.with_suffix(".ollama.log"))
    keeper.start()
    t0, cpu0, machine0 = time.monotonic(), children_cpu(), machine_busy()
    with log.open("w") as out, log.with_suffix(".stderr").open("w") as err, contextlib.closing(keeper):
        proc = subprocess.Popen([sys.executable, "-m", "entrypoint"], cwd=workspace, env=env, text=True,
                                errors="replace", stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
            out.write(f"{lines[-1][0] - t0:9.3f} {line}")
        code = proc.wait()
    t1, cpu1, machine1 = time.monotonic(), children_cpu(), machine_busy()
    samples = sampler.stop()
    if code != 0:
        raise RuntimeError(f"the action exited with {code}; log in {log}:\n"
                           + "\n".join(text for _, text in lines[-30:]))
    _verify(setup, repository)
    result = summarize(variant, model, index, stages_from_log(lines, t0, t1), samples, t0, t1, cpu1 - cpu0,
                       machine1 - machine0)
    outputs = workspace / "ollama-publish-out"
    result.files = {q: allocated(next(outputs.glob(f"*-{tag_suffix(q)}.gguf"))) for q in setup.quantizations}
    return result


class _LogKeeper(threading.Thread):
    """Copies the action's Ollama server log out of its scratch space (deleted at the end) every second."""

    def __init__(self, run_dir: Path, target: Path):
        super().__init__(daemon=True)
        self.run_dir, self.target, self.done = run_dir, target, threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for source in self.run_dir.rglob("ollama-server.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(source, self.target)

    def close(self) -> None:
        self.done.set()
        self.join()


def allocated(path: Path) -> int:
    """Bytes on disk of a file, or of everything under a folder."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


def stages_from_log(lines: list[tuple[float, str]], t0: float, t1: float) -> Timeline:
    """Map the action's groups to the common stages, splitting two groups at the log line that starts a step."""
    timeline = Timeline()
    groups: list[tuple[str, float, float, list[tuple[float, str]]]] = []
    current: tuple[str, float, list[tuple[float, str]]] | None = None
    for t, text in lines:
        if text.startswith("::group::"):
            current = (text.removeprefix("::group::"), t, [])
        elif text.startswith("::endgroup::") and current is not None:
            groups.append((current[0], current[1], t, current[2]))
            current = None
        elif current is not None:
            current[2].append((t, text))
    if not groups:
        timeline.add("other", t0, t1)
        return timeline
    timeline.add("setup", t0, groups[0][1])
    timeline.add("teardown", groups[-1][2], t1)

    def first(body: list[tuple[float, str]], test, default: float) -> float:
        return next((t for t, text in body if test(text)), default)

    for title, start, end, body in groups:
        lowered = title.lower()
        if "start ollama" in lowered:
            timeline.add("start ollama", start, end)
        elif "download" in lowered:
            timeline.add("download", start, end)
        elif "convert" in lowered:
            split = first(body, lambda text: text.startswith("quantizing to"), end)
            timeline.add("convert", start, split)
            timeline.add("quantize", split, end)
        elif "modelfile" in lowered:
            timeline.add("create", start, end)
        elif "create" in lowered:
            # The smoke test logs nothing before its first answer: it starts after the line before that.
            # Checks switched off (smoke-test: off, prompt-parity: off) print neither line.
            answered = first(body, lambda text: "(done_reason:" in text, end + 1)
            smoke = max([start] + [t for t, _ in body if t < answered]) if answered <= end else end
            parity = first(body, lambda text: text.startswith("prompt parity of"), smoke)
            timeline.add("create", start, min(parity, smoke))
            timeline.add("prompt parity", parity, smoke)
            timeline.add("smoke test", smoke, end)
        elif "push" in lowered:
            timeline.add("push", start, end)
        else:
            timeline.add("other", start, end)
    return timeline


def _verify(setup: Setup, repository: str) -> None:
    """Both ways must leave every tag in the registry (the ollama CLI can exit 0 without pushing)."""
    expected = sorted(tag for _, tag in release_tags(setup.quantizations))
    found = registry_tags(setup.registry, repository)
    if found != expected:
        raise RuntimeError(f"{repository}: the registry holds tags {found}, expected {expected}")
