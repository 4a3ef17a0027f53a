"""Background sampling of what a run holds: bytes on disk under its folder, and the summed RSS of its
process tree (read from /proc). One sample every `interval` seconds, each with a monotonic timestamp."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic()
    disk: int  # bytes allocated (st_blocks * 512) under the run's folder, each inode counted once
    disk_by_part: dict[str, int]  # the same, per top-level sub-folder of the run's folder
    rss: int  # summed resident set size of the run's processes
    processes: int
    cpu: float  # CPU seconds (user+sys) of the run's live processes and the children they have reaped
    rss_by_process: dict[str, int]  # RSS summed per kind of process ("python convert_hf_to_gguf.py", ...)
    shared_cpu: float = 0.0  # CPU seconds so far of the shared servers (Hub, registry) and their children

    @property
    def runner_rss(self) -> int:
        """RSS of Ollama's model runners: only the checks load a model."""
        return self.rss_by_process.get("ollama runner", 0)


def part(rel: str) -> str:
    """What a folder of a run holds, from its path relative to the run's folder."""
    parts = rel.split("/")
    scratch = next((i for i, p in enumerate(parts) if p.startswith(".ollama-publish-")), None)
    if scratch is not None:  # the action's scratch space, inside output-dir
        inside = parts[scratch + 1] if len(parts) > scratch + 1 else ""
        return {"models": "Ollama models (scratch)", "checkpoint": "checkpoint (scratch)"}.get(
            inside, "scratch (intermediate GGUF, logs)")
    return {"hf": "Hub cache (HF_HOME)", "home": "Ollama models (HOME/.ollama)", "work": "work dir",
            "workspace": "output dir", "runner_temp": "RUNNER_TEMP", "tmp": "TMPDIR"}.get(parts[0], parts[0])


def disk_usage(root: Path) -> tuple[int, dict[str, int]]:
    """Allocated bytes under root, as `du` counts them (a hard-linked file once, symlinks as links),
    in total and by part (see part(); a file hard-linked from two parts counts in the first one seen)."""
    seen: set[tuple[int, int]] = set()
    parts: dict[str, int] = {}
    stack = [(root, "", "")]
    while stack:
        folder, rel, label = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # removed while we looked
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            child = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            name = part(child) if is_dir or not label else label
            parts[name] = parts.get(name, 0) + st.st_blocks * 512
            if is_dir:
                stack.append((Path(entry.path), child, name))
    return sum(parts.values()), parts


def process_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, RSS bytes, CPU seconds of it and its reaped children) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields from the 3rd (state) on
        cpu = sum(int(x) for x in fields[11:15]) / TICK  # utime, stime, cutime, cstime
        table[int(entry.name)] = (int(fields[1]), int(fields[21]) * PAGE, cpu)
    return table


def label(pid: int) -> str:
    """A short name for a process: the program, and the script or subcommand it runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    program = os.path.basename(argv[0])
    args = [a for a in argv[1:] if a not in ("-I", "-P")]
    if program.startswith("python") and args and os.path.basename(args[0]) == "sealed.py" and "--" in args:
        args = args[args.index("--") + 1:]  # a sealed Python tool: named by the script it runs
        return "python " + (os.path.basename(args[0]) if args else "sealed.py")
    if program.startswith("python") and args:
        return "python " + (f"-m {args[1]}" if args[0] == "-m" and len(args) > 1 else
                            "-c" if args[0] == "-c" else os.path.basename(args[0]))
    if program == "ollama" and len(argv) > 1:
        return f"ollama {argv[1]}"
    return program


def tree(root: int, table: dict[int, tuple[int, int, float]], exclude: frozenset[int]) -> list[int]:
    """The descendants of root (not root itself), leaving out the subtrees of the excluded pids."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class Sampler(threading.Thread):
    """Samples `folder` and the processes below this one (minus `exclude`: the shared Hub and registry)."""

    def __init__(self, folder: Path, exclude: frozenset[int], interval: float):
        super().__init__(daemon=True)
        self.folder = folder
        self.exclude = exclude
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def sample(self) -> Sample:
        t = time.monotonic()
        disk, parts = disk_usage(self.folder)
        table = process_table()
        pids = tree(os.getpid(), table, self.exclude)
        shared = [p for p in self.exclude if p in table]
        for root in self.exclude:
            shared += tree(root, table, frozenset())
        by_process: dict[str, int] = {}
        for pid in pids:
            name = label(pid)
            by_process[name] = by_process.get(name, 0) + table[pid][1]
        return Sample(t=t, disk=disk, disk_by_part=parts, rss=sum(table[p][1] for p in pids), processes=len(pids),
                      cpu=sum(table[p][2] for p in pids), rss_by_process=by_process,
                      shared_cpu=sum(table[p][2] for p in set(shared)))

    def run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop_event.wait(self.interval):
                break

    def stop(self) -> list[Sample]:
        self._stop_event.set()
        self.join()
        self.samples.append(self.sample())
        return self.samples


def machine_busy() -> float:
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK  # user nice system idle iowait irq softirq steal


def wait_for_quiet(threshold: float, timeout: float, log) -> float:
    """Wait (up to timeout) until the machine uses fewer than `threshold` cores over 3 s; return that load."""
    deadline = time.monotonic() + timeout
    while True:
        before = machine_busy()
        time.sleep(3)
        load = (machine_busy() - before) / 3
        if load < threshold or time.monotonic() > deadline:
            if load >= threshold:
                log(f"the machine is still busy ({load:.1f} cores in use); running anyway")
            return load
        log(f"waiting for other work on the machine to finish ({load:.1f} cores in use)")
        time.sleep(10)
