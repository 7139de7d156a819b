"""Number formatting and the tables shared by the comparison sections."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.perf.common import GIB, MIB, Run


def fmt_num(x: float | None, fmt: str = ".2f", unit: str = "") -> str:
    """``x`` in format ``fmt`` with ``unit``; ``n/a`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:{fmt}}{unit}"


def gib(x: float | None) -> str:
    """Bytes as GiB with two decimals (no unit)."""
    return fmt_num(None if x is None else x / GIB, ".2f")


def fmt_ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x``; ``n/a`` when either is missing or ``b`` is 0."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def fmt_goal(value: float | None, limit: float) -> str:
    """A ratio against its goal (at most ``limit``), met or not."""
    if value is None or math.isnan(value):
        return "not measured"
    return f"{value:.2f} (goal <= {limit:g}: {'met' if value <= limit else 'NOT met'})"


def fmt_rounds(run: Run) -> str:
    """The run's round times, ``r1 / r2 / ...``."""
    return " / ".join(f"{t:.2f}" for t in run.rounds) if run.rounds else "-"


def brief(run: Run) -> str:
    """One progress line about a finished run."""
    if run.error:
        return f"FAILED ({run.error})"
    return (f"rounds {fmt_rounds(run)} s, steady {run.steady:.2f} s, whole {run.whole:.1f} s, "
            f"peak {run.peak_pss / GIB:.2f} GiB")


def fmt_bytes(x: float | None) -> str:
    """Bytes in the largest binary unit that fits (GiB, MiB, KiB, B)."""
    if x is None:
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def run_table(runs: Sequence[Run], reference: Run | None, ref_label: str) -> list[str]:
    """Markdown rows: per-round times, steady mean, ratio to ``reference``, whole run, memory."""
    lines = [
        "| runner | seconds per round (r1 / r2 / ...) | steady mean, rounds >= 2 (s) "
        f"| steady / {ref_label} | whole run (s) | start-up + shutdown (s) "
        "| peak memory, all processes (GiB PSS) | processes at peak | final mean test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if r.error:
            lines.append(f"| {r.runner} | FAILED: {r.error} | | | | | | | |")
            continue
        ratio = ("n/a" if reference is None or reference.error
                 else fmt_ratio(r.steady, reference.steady))
        lines.append(
            f"| {r.runner} | {fmt_rounds(r)} | {r.steady:.2f} | {ratio} | "
            f"{fmt_num(r.whole, '.1f')} | {fmt_num(r.startup, '.1f')} | {gib(r.peak_pss)} | "
            f"{r.peak_procs} | {fmt_num(r.accuracy, '.3f')} |"
        )
    return lines


def peak_lines(runs: Sequence[Run]) -> list[str]:
    """Largest process kinds at each run's memory peak, and each run's steady phase split."""
    out = []
    for r in runs:
        if r.extra.get("retried_after"):
            out.append(f"- {r.runner} was re-run once; its first attempt failed at start-up: "
                       f"{r.extra['retried_after'][:200]}")
        if r.error:
            continue
        if r.extra.get("peak_top"):
            out.append(f"- {r.runner}, largest processes at the peak (MiB PSS): "
                       f"{r.extra['peak_top']}")
        phases = r.extra.get("phases")
        if phases and len(phases) > 1:
            mean = {k: float(np.mean([p[k] for p in phases[1:]])) for k in phases[0]}
            out.append(f"- {r.runner}, steady round split (s): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
    return out


def describe(cfg: dict[str, Any]) -> str:
    """The work of a comparison preset, in one sentence."""
    m, d, t, f = cfg["model"], cfg["data"], cfg["train"], cfg["federation"]
    task = m.get("task", "sequence-classification")
    return (f"model `{m['name']}` ({task}, LoRA r={m['peft']['r']}), dataset `{d['dataset']}`, "
            f"{d['num_clients']} clients x {d['examples_per_client']} examples (partition "
            f"`{d['partition']['kind']}`; 60/15/25 train/val/test), {t['local_epochs']} local "
            f"epoch(s), batch {t['batch_size']}, {f['rounds']} rounds, FedAvg, every client "
            "evaluated on its val and test split every round, client num_cpus=1 (2 clients at a "
            "time on 2 CPUs)")
