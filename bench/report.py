"""Medians, ratios ours/baseline, per-stage figures and growth with model size, as one markdown text."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from bench.recipes import CHECK_STAGES, STAGES, RunResult

MB = 1e6
# ours/baseline ratios the issue asks for: (label, attribute, target)
TARGETS = (("peak disk", "peak_disk", 0.5), ("wall time", "total", 0.8), ("peak RSS", "peak_rss", 1.0))

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, unit: str) -> str:
    if unit == "MB":
        return f"{value / MB:,.0f} MB"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:.2f}"


class Results:
    def __init__(self, runs: list[RunResult]):
        self.runs = runs

    def select(self, model: str, variant: str) -> list[RunResult]:
        if variant.endswith(" minus checks"):
            return [r.without_checks() for r in self.select(model, variant.removesuffix(" minus checks"))]
        return [r for r in self.runs if r.model == model and r.variant == variant]

    def med(self, model: str, variant: str, get: Callable[[RunResult], float]) -> float:
        return median([get(r) for r in self.select(model, variant)])

    def stage(self, model: str, variant: str, stage: str, field: str) -> float:
        runs = [r for r in self.select(model, variant) if stage in r.stages]
        return median([getattr(r.stages[stage], field) for r in runs]) if runs else float("nan")


def totals_table(res: Results, model: str, same_work: str) -> list[str]:
    lines = [f"| median of runs | baseline | ours (checks on) | ours / baseline | {same_work} | ours / baseline "
             "| target |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, attribute, target in TARGETS:
        unit = "s" if attribute == "total" else "MB"
        base = res.med(model, "baseline", lambda r, a=attribute: getattr(r, a))
        cells = [label, _fmt(base, unit)]
        for variant in ("ours", same_work):
            value = res.med(model, variant, lambda r, a=attribute: getattr(r, a))
            ratio = value / base
            cells += [_fmt(value, unit), f"**{ratio:.3f}** {'met' if ratio <= target else 'missed'}"]
        cells.append(f"≤ {target}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["CPU time (user+sys)", _fmt(res.med(model, "baseline", lambda r: r.cpu), "s")]
    for variant in ("ours", same_work):
        value = res.med(model, variant, lambda r: r.cpu)
        cells += [_fmt(value, "s"), f"{value / res.med(model, 'baseline', lambda r: r.cpu):.2f}"]
    lines.append("| " + " | ".join(cells) + " | |")
    loads = [f"{res.med(model, v, lambda r: r.foreign_load):.2f}" for v in ("baseline", "ours")]
    checks_off = same_work == "ours, checks off"
    loads.append(f"{res.med(model, same_work, lambda r: r.foreign_load):.2f}" if checks_off else "")
    shared = [f"{res.med(model, v, lambda r: r.shared_cpu):.1f} s" for v in ("baseline", "ours", same_work)]
    lines.append(f"| CPU time of the shared Hub and registry | {shared[0]} | {shared[1]} | | {shared[2]} | | |")
    lines.append(f"| other people's load on the machine (cores) | {loads[0]} | {loads[1]} | | {loads[2]} | | |")
    return lines


def checks_table(res: Results, model: str) -> list[str]:
    total = res.med(model, "ours", lambda r: r.total)
    lines = ["| check | median seconds | share of ours's run |", "|---|---:|---:|"]
    both = 0.0
    for stage in CHECK_STAGES:
        seconds = res.stage(model, "ours", stage, "seconds")
        both += seconds
        lines.append(f"| {stage} | {seconds:.1f} s | {100 * seconds / total:.0f}% |")
    per_run = median([sum(r.stages[s].seconds for s in CHECK_STAGES if s in r.stages)
                      for r in res.select(model, "ours")])
    lines.append(f"| both (median of per-run sums) | {per_run:.1f} s | {100 * per_run / total:.0f}% |")
    if res.select(model, "ours, checks off"):
        off = res.med(model, "ours, checks off", lambda r: r.total)
        lines.append(f"| difference of the medians: ours − ours, checks off | {total - off:.1f} s "
                     f"| {100 * (total - off) / total:.0f}% |")
    return lines


def stage_table(res: Results, model: str, variants: list[str]) -> list[str]:
    head = ["stage"] + [f"{v} s" for v in variants] + [f"{v} peak disk" for v in variants] + \
        [f"{v} peak RSS" for v in variants]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for stage in STAGES:
        if not any(stage in r.stages for v in variants for r in res.select(model, v)):
            continue
        cells = [stage]
        for field, unit in (("seconds", "s"), ("peak_disk", "MB"), ("peak_rss", "MB")):
            for v in variants:
                value = res.stage(model, v, stage, field)
                cells.append("–" if value != value or (unit == "MB" and stage == "other") else _fmt(value, unit))
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**total**"] + [_fmt(res.med(model, v, lambda r: r.total), "s") for v in variants] + \
        [_fmt(res.med(model, v, lambda r: r.peak_disk), "MB") for v in variants] + \
        [_fmt(res.med(model, v, lambda r: r.peak_rss), "MB") for v in variants]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def peak_parts(res: Results, model: str, variant: str) -> str:
    """What was on disk at the peak of the run with the median peak."""
    runs = sorted(res.select(model, variant), key=lambda r: r.peak_disk)
    run = runs[len(runs) // 2]
    parts = sorted(run.peak_disk_parts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in parts if v >= 0.5 * MB)


def peak_processes(res: Results, model: str, variant: str) -> str:
    """Which processes held the memory at the RSS peak of the run with the median peak."""
    runs = sorted(res.select(model, variant), key=lambda r: r.peak_rss)
    run = runs[len(runs) // 2]
    parts = sorted(run.peak_rss_parts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in parts if v >= 0.5 * MB)


def disk_model(res: Results, model: str, quantizations: list[str]) -> list[str]:
    """The written disk model (docs/benchmark.md) with this run's file sizes, against the measured peaks.

    baseline keeps everything: S + F + ΣQ + ΣQ (Hub cache, 16-bit GGUF, quantized GGUFs, Ollama's copies).
    ours, in one pass with the weights streamed from the Hub: converting and quantizing hold ΣQ and a window
    of about one tensor, creating and pulling back ΣQ (Ollama, and the empty Ollama of the pull-back, get the
    weights as hard links, not copies)."""
    base = res.select(model, "baseline")
    mine = res.select(model, "ours")
    if not base or not mine or not base[0].files or not mine[0].files:
        return []
    S = median([r.files["checkpoint"] for r in base])
    F = median([r.files["F16"] for r in base])
    q_base = sum(median([r.files[q] for r in base]) for q in quantizations)
    q_ours = sum(median([r.files[q] for r in mine]) for q in quantizations)
    phases = {"convert": q_ours, "create": q_ours}
    predicted_ours = q_ours
    predicted_base = S + F + 2 * q_base
    measured = {v: res.med(model, v, lambda r: r.peak_disk) for v in ("baseline", "ours")}
    stage = {k: res.stage(model, "ours", k, "peak_disk") for k in phases}

    def row(label: str, predicted: float, got: float) -> str:
        off = 100 * (got - predicted) / predicted
        return f"| {label} | {predicted / MB:,.0f} MB | {got / MB:,.0f} MB | {off:+.1f}% |"

    return [f"S = {S / MB:,.0f} MB (checkpoint in the Hub cache), F = {F / MB:,.0f} MB (16-bit GGUF), "
            f"ΣQ = {q_ours / MB:,.0f} MB ({' + '.join(quantizations)}).", "",
            "| | model predicts | measured peak (median) | measured − predicted |", "|---|---:|---:|---:|",
            row("baseline: S + F + 2ΣQ", predicted_base, measured["baseline"]),
            row("ours, converting and quantizing: ΣQ (and a window of one tensor)", phases["convert"],
                stage["convert"]),
            row("ours, creating: ΣQ (hard links)", phases["create"], stage["create"]),
            row("ours, the whole run: ΣQ (the pull-back links the weights)", predicted_ours, measured["ours"])]


def growth_table(res: Results, small: str, big: str, params: dict[str, int], variants: list[str]) -> list[str]:
    n1, n2 = params[small], params[big]
    lines = [f"| variant | peak disk {small} | peak disk {big} | bytes of peak disk per parameter (slope) "
             f"| wall {small} | wall {big} | seconds per billion parameters (slope) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        d1, d2 = (res.med(m, v, lambda r: r.peak_disk) for m in (small, big))
        t1, t2 = (res.med(m, v, lambda r: r.total) for m in (small, big))
        lines.append(f"| {v} | {d1 / MB:,.0f} MB | {d2 / MB:,.0f} MB | {(d2 - d1) / (n2 - n1):.2f} | {t1:.1f} s "
                     f"| {t2:.1f} s | {(t2 - t1) / (n2 - n1) * 1e9:.0f} |")
    return lines


def runs_table(res: Results) -> list[str]:
    lines = ["| model | variant | run | wall | peak disk | peak RSS | CPU | checks | Hub+registry CPU | others' load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res.runs:
        checks = sum(r.stages[s].seconds for s in CHECK_STAGES if s in r.stages)
        lines.append(f"| {r.model} | {r.variant} | {r.index} | {r.total:.1f} s | {r.peak_disk / MB:,.0f} MB "
                     f"| {r.peak_rss / MB:,.0f} MB | {r.cpu:.1f} s | {f'{checks:.1f} s' if checks else '–'} "
                     f"| {r.shared_cpu:.1f} s | {r.foreign_load:.2f} cores |")
    return lines


def markdown(runs: list[RunResult], header: list[str], models: list[str], params: dict[str, int],
             checkpoint_bytes: dict[str, int], checks_off: bool, quantizations: list[str]) -> str:
    res = Results(runs)
    same_work = "ours, checks off" if checks_off else "ours minus checks"
    variants = ["baseline", "ours"] + (["ours, checks off"] if checks_off else [])
    out = list(header)
    for model in models:
        count = len(res.select(model, "baseline"))
        out += ["", f"### {model}: {params[model] / 1e6:.1f}M parameters, checkpoint "
                    f"{checkpoint_bytes[model] / MB:,.0f} MB ({count} runs of each, alternating)", ""]
        out += totals_table(res, model, same_work)
        label = ("the action's own runs with its checks switched off by inputs (see above)" if checks_off else
                 "ours's own runs with the prompt-parity and smoke-test stages taken out (their time, and their "
                 "samples from the peaks): the action cannot switch them off")
        out += ["", f"`{same_work}`: {label}.", ""]
        out += ["Cost of the checks in ours:", ""] + checks_table(res, model)
        out += ["", "Per stage (medians; peak = highest sample during the stage):", ""]
        out += stage_table(res, model, variants)
        out += ["", "On disk at the peak (run with the median peak):", ""]
        for v in variants:
            out.append(f"- {v}: {peak_parts(res, model, v)}")
        out += ["", "In memory at the RSS peak (run with the median peak):", ""]
        for v in variants:
            out.append(f"- {v}: {peak_processes(res, model, v)}")
        check = disk_model(res, model, quantizations)
        if check:
            out += ["", "Disk model (docs/benchmark.md) with this checkpoint's sizes:", ""] + check
    if len(models) == 2:
        out += ["", f"### Growth with size (from the two sizes: {params[models[0]] / 1e6:.1f}M and "
                    f"{params[models[1]] / 1e6:.1f}M parameters)", ""]
        out += growth_table(res, models[0], models[1], params, variants + ["ours minus checks"] * (not checks_off))
    out += ["", "### Every run", ""] + runs_table(res)
    return "\n".join(out) + "\n"
