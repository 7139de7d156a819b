"""The report: header, sections in order, the sections reused from an earlier run, raw JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.perf.aggregation import AggRow
from benchmarks.perf.aggregation_report import aggregation_section
from benchmarks.perf.bytes_moved import bytes_section
from benchmarks.perf.common import Run
from benchmarks.perf.explain import explanations
from benchmarks.perf.flower import flower_section
from benchmarks.perf.goals import goals_section
from benchmarks.perf.machine import gpu_line, machine_line
from benchmarks.perf.overhead import overhead_section
from benchmarks.perf.pool import pool_section

MEASURED = ("overhead", "flower", "pool", "aggregation")  # the sections that run something
CLOCK = ("Peak memory = PSS summed over the measured process and all its descendants (Ray's GCS, "
         "raylet, object store and workers included), sampled every 0.25 s by one psutil sampler "
         "(`TreeMemorySampler`) for every runner. A round ends when its evaluation (and, for "
         "fedbip, its checkpoint) is done; round r's time is the time since round r-1 ended "
         "(round 1: since the clients were ready).")


@dataclass
class Results:
    """Everything the sections report: comparison runs by (model, runner), pool runs,
    aggregation cases."""

    cache: dict[tuple[str, str], Run] = field(default_factory=dict)
    pool: list[Run] = field(default_factory=list)
    agg: list[AggRow] = field(default_factory=list)

    def fedbip_runs(self) -> list[Run]:
        """Every fedbip run (comparison runs, then pool runs)."""
        return [r for (_, runner), r in self.cache.items() if runner == "fedbip"] + self.pool


def load_reused(path: Path, args: argparse.Namespace) -> tuple[Results, dict[str, str]]:
    """The sections of an earlier ``--json`` file that this run does not select (whole sections,
    so that every table comes from one run), and {reused section: the command of the run that
    measured it}. The overhead and Flower sections share their fedbip runs, so they are reused
    together or not at all."""
    raw = json.loads(Path(path).read_text())
    runs = [Run(**{k: v for k, v in d.items() if k not in ("steady", "startup")})
            for d in raw.get("runs", [])]
    secs = set(args.sections)
    res = Results()
    names: list[str] = []
    if not secs & {"overhead", "flower"}:
        res.cache = {(r.workload, r.runner): r for r in runs if not r.workload.startswith("pool-")}
        names += ["overhead", "flower"]
    if "pool" not in secs:
        res.pool = [r for r in runs if r.workload.startswith("pool-")]
        names += ["pool"] if res.pool else []
    if "aggregation" not in secs:
        res.agg = [AggRow(**d) for d in raw.get("aggregation", [])]
        names += ["aggregation"] if res.agg else []
    sources = raw.get("sources") or {}
    command = str(raw.get("command", "not recorded"))
    return res, {n: str(sources.get(n, command)) for n in names}


def command_line(argv: Sequence[str] | None) -> str:
    """The command that produced the report."""
    given = list(argv) if argv is not None else sys.argv[1:]
    return "python benchmarks/performance.py" + "".join(f" {a}" for a in given)


def header(args: argparse.Namespace, command: str, reused: dict[str, str],
           wall: float) -> list[str]:
    """Command, machine, GPU, how figures are measured, and the sections reused."""
    ran = set(args.sections) - {"bytes"}
    timing = (f"Benchmark wall time: {wall:.0f} s. " if ran else
              "Every section below is reused (nothing was run by this command). ")
    lines = ["# Performance and scale", "",
             f"Command: `{command}`", "",
             f"Machine: {machine_line()}", "",
             gpu_line(), "",
             timing + CLOCK, ""]
    if reused:
        lines += [f"Sections reused from `{args.reuse}`, not run again (each section's tables "
                  "come from one run; the command of that run):", "",
                  *[f"- {name}: `{cmd}`" for name, cmd in reused.items()], ""]
    return lines


def report(args: argparse.Namespace, command: str, res: Results, reused: dict[str, str],
           wall: float) -> str:
    """The whole markdown report: the goals first, then the sections run or reused."""
    shown = set(args.sections) | set(reused)
    lines = header(args, command, reused, wall)
    lines += goals_section(res.cache, res.pool, res.agg)
    if args.inprocess:
        lines += ["fedbip runs were in-process (`--inprocess`): whole-run times are not measured "
                  "and peak memory includes the benchmark process.", ""]
    if "overhead" in shown:
        lines += overhead_section(res.cache, args.overhead_models)
    if "flower" in shown:
        lines += flower_section(res.cache, args.flower_models, args.flower_variants)
    if "pool" in shown:
        lines += pool_section(res.pool)
    if "aggregation" in shown:
        lines += aggregation_section(res.agg)
    if "bytes" in shown:
        lines += bytes_section(res.fedbip_runs())
    lines += ["## 6. GPU", "", gpu_line(), ""]
    if "flower" in shown:
        lines += explanations(res.cache)
    return "\n".join(lines)


def raw_results(args: argparse.Namespace, command: str, res: Results,
                reused: dict[str, str]) -> dict[str, Any]:
    """The ``--json`` file: the command, where each section comes from, every run and case."""
    ran = {n: command for n in MEASURED if n in args.sections}
    return {"command": command,
            "sources": {**ran, **reused},
            "runs": [dataclasses.asdict(r) | {"steady": r.steady, "startup": r.startup}
                     for r in [*res.cache.values(), *res.pool]],
            "aggregation": [dataclasses.asdict(r) for r in res.agg]}
