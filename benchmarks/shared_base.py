"""Memory per node with 1, 2 and 4 client actors on one node: every actor with a private copy of
the frozen base model (``resources.share_base_model: false``) against one shared copy in Ray's
object store (the default), side by side with Flower 1.42's simulation engine on the same work.

Each run is one small federation (4 clients, 1 round, FedAvg, every client evaluated) in a
measured child process; k actors get ``num_cpus_per_client = 2 / k`` on the 2-CPU local Ray,
and Flower runs the same ClientApp work with ``client_resources.num_cpus = 2 / k`` (k workers
at a time), keeping one model per worker (``flower-cached``, as Flower's LLM template does).
Memory is the peak over the run of the **PSS** summed over the child's whole process tree (the
driver, Ray's raylet with its object store, GCS and every worker; psutil, sampled every
0.25 s by the performance benchmark's :class:`TreeMemorySampler`): shared pages are counted
once across the processes that map them, so the total is the node's memory.

Usage::

    python benchmarks/shared_base.py [--models minilm,smollm2] [--actors 1,2,4]
        [--flower-python PATH] [--out benchmarks/results/shared_base.md]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf.common import (  # noqa: E402
    DEFAULT_FLOWER_PYTHON,
    GIB,
    MIB,
    Run,
    fail_run,
    log,
)
from benchmarks.perf.fedbip_run import fedbip_run  # noqa: E402
from benchmarks.perf.flower import flower_run  # noqa: E402
from benchmarks.perf.machine import machine_line  # noqa: E402
from benchmarks.perf.presets import model_config, prepare_shards  # noqa: E402

DEFAULT_OUT = Path("benchmarks/results/shared_base.md")
NODE_CPUS = 2
NUM_CLIENTS = 4
EXAMPLES = {"minilm": 16, "smollm2": 8}
GOAL = 0.6  # fedbip's peak / Flower's peak with 2 or more actors per node
RUNNERS = ("private", "shared", "flower-cached")


@dataclass(frozen=True)
class Cell:
    """One measured run: a model, a number of actors (workers), a runner."""

    model: str
    actors: int
    runner: str
    run: Run


def work_config(model: str, actors: int, share: bool) -> dict[str, Any]:
    """The small federation of ``model`` with ``actors`` client actors on a 2-CPU node."""
    cfg = copy.deepcopy(model_config(model, quick=True))
    cfg["data"]["num_clients"] = NUM_CLIENTS
    cfg["data"]["examples_per_client"] = EXAMPLES[model]
    cfg["federation"]["rounds"] = 1
    cfg["resources"] = {"num_cpus_per_client": NODE_CPUS / actors, "num_actors": actors,
                        "share_base_model": share}
    return cfg


def warm_model_cache(model: str) -> None:
    """SmolLM2's one-time safetensors conversion, before any measured run."""
    if model == "smollm2":
        from fedbip_ray.models.smollm2 import smollm2_model_dir

        smollm2_model_dir()


def base_mib(model: str) -> float:
    """MiB of the frozen base weights of ``model`` (what sharing saves per extra actor)."""
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.models.shared_base import build_frozen_base

    cfg = config_from_dict(work_config(model, 1, True))
    return build_frozen_base(cfg, 2).nbytes / MIB


def measure(model: str, actors: int, runner: str, work: Path, flower_python: str) -> Run:
    """One run of ``runner`` (``private``, ``shared`` or ``flower-cached``)."""
    cfg = work_config(model, actors, runner == "shared")
    where = work / f"{model}-{actors}-{runner}"
    where.mkdir(parents=True, exist_ok=True)
    if runner.startswith("flower"):
        shards, num_labels, _ = prepare_shards(cfg, where / "shards")
        return flower_run(model, runner.removeprefix("flower-"), cfg, shards, num_labels, where,
                          NODE_CPUS, flower_python)
    return fedbip_run(model, cfg, where, inprocess=False)


def run_all(models: Sequence[str], actor_counts: Sequence[int], flower_python: str,
            work: Path, done: Callable[[list[Cell]], None]) -> list[Cell]:
    """Every (model, actors, runner) once; ``done(cells so far)`` after each."""
    cells: list[Cell] = []
    for model in models:
        warm_model_cache(model)
        for k in actor_counts:
            for runner in RUNNERS:
                t0 = time.perf_counter()
                run = measure(model, k, runner, work, flower_python)
                log(f"{model} x{k} {runner}: peak {run.peak_pss / GIB:.2f} GiB, "
                    f"{time.perf_counter() - t0:.0f} s{' ERROR ' + run.error if run.error else ''}")
                cells.append(Cell(model, k, runner, run))
                done(cells)
    return cells


def _gib(run: Run) -> str:
    if run.error:
        return "not run" if run.error == "not run" else "failed"
    return f"{run.peak_pss / GIB:.2f}"


def _ratio(a: Run, b: Run) -> float | None:
    if a.error or b.error or not b.peak_pss:
        return None
    return a.peak_pss / b.peak_pss


def _fmt_ratio(x: float | None, goal: float | None = None) -> str:
    if x is None:
        return "n/a"
    if goal is None:
        return f"{x:.2f}x"
    return f"{x:.2f}x ({'met' if x <= goal else 'not met'})"


def table(cells: Sequence[Cell], sizes: dict[str, float]) -> list[str]:
    """One row per (model, actors): the three peaks and the ratios."""
    by = {(c.model, c.actors, c.runner): c.run for c in cells}
    missing = fail_run("", "", "not run")
    out = ["| model (frozen base) | actors | private copies | shared base | Flower (cached) "
           "| saved by sharing (MiB) | shared / private | shared / Flower (goal <= 0.6x from 2 "
           "actors) | same accuracy |",
           "|---|---|---|---|---|---|---|---|---|"]
    for model, k in sorted({(c.model, c.actors) for c in cells},
                           key=lambda mk: (list(EXAMPLES).index(mk[0]), mk[1])):
        priv, shared, flower = (by.get((model, k, r), missing) for r in RUNNERS)
        same = ("n/a" if priv.error or shared.error else
                "yes" if priv.accuracy == shared.accuracy else
                f"no ({priv.accuracy} vs {shared.accuracy})")
        saved = ("n/a" if priv.error or shared.error else
                 f"{(priv.peak_pss - shared.peak_pss) / MIB:.0f}")
        out.append(f"| {model} ({sizes.get(model, float('nan')):.0f} MiB) | {k} | {_gib(priv)} "
                   f"| {_gib(shared)} | {_gib(flower)} | {saved} "
                   f"| {_fmt_ratio(_ratio(shared, priv))} "
                   f"| {_fmt_ratio(_ratio(shared, flower), GOAL if k >= 2 else None)} | {same} |")
    return out


def breakdown(cells: Sequence[Cell]) -> list[str]:
    """The largest process kinds at each run's peak (MiB of PSS), and any errors."""
    out = []
    for c in cells:
        detail = c.run.error or c.run.extra.get("peak_top", "")
        out.append(f"- {c.model} x{c.actors} {c.runner}: {detail}")
    return out


def report(cells: Sequence[Cell], sizes: dict[str, float], command: str, wall: float) -> str:
    """The markdown report."""
    lines = [
        "# One frozen base model per node: memory with 1, 2 and 4 client actors", "",
        f"Command: `{command}` (wall time {wall:.0f} s).", "",
        f"Machine: {machine_line()}. The machine was shared with other work while this ran "
        "(memory figures are per run and not affected by it; times are).", "",
        f"Work per run: {NUM_CLIENTS} clients, 1 round, FedAvg, every client trained 1 local "
        "epoch and evaluated on its val and test split; MiniLM + LoRA on Rotten Tomatoes "
        f"({EXAMPLES['minilm']} examples per client), SmolLM2-135M-Instruct + LoRA on the "
        f"instruction tasks ({EXAMPLES['smollm2']} examples per client, causal-lm, bf16 "
        "autocast on CPU, fp32 weights). k actors = `resources.num_actors: k` with "
        f"`num_cpus_per_client: {NODE_CPUS}/k` on a {NODE_CPUS}-CPU local Ray; Flower: the same "
        f"ClientApp work with `client_resources.num_cpus: {NODE_CPUS}/k` (k workers at a time), "
        "one model kept per worker process.", "",
        "Memory: peak over the whole run (start-up included) of the **PSS** summed over every "
        "process of the run (driver, Ray's raylet and object store, GCS, workers), in GiB; PSS "
        "counts a page shared by n processes as 1/n in each, so the sum counts the shared base "
        "once. `private copies` = `resources.share_base_model: false` (every actor loads its "
        "own base, as before); `shared base` = the default (one copy in the node's object "
        "store, mapped read-only into every actor).", "",
        *table(cells, sizes), "",
        "At each run's peak, the largest process kinds (MiB of PSS):", "",
        *breakdown(cells), "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,smollm2",
                   type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--actors", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--flower-python", default=DEFAULT_FLOWER_PYTHON)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    bad = [m for m in args.models if m not in EXAMPLES]
    if bad:
        p.error(f"--models: unknown {bad[0]!r} (known: {', '.join(EXAMPLES)})")
    if any(k < 1 or NODE_CPUS / k < 0.1 for k in args.actors):
        p.error("--actors: each count must be between 1 and 20")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every cell, print the report and write it to ``--out``."""
    args = parse_args(argv)
    given = list(argv) if argv is not None else sys.argv[1:]
    command = "python benchmarks/shared_base.py" + "".join(f" {a}" for a in given)
    t0 = time.perf_counter()
    sizes = {m: base_mib(m) for m in args.models}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(cells: list[Cell]) -> None:  # after every run: a slow machine keeps what ran
        args.out.write_text(report(cells, sizes, command, time.perf_counter() - t0))

    with tempfile.TemporaryDirectory(prefix="fedbip-shared-base-") as tmp:
        cells = run_all(args.models, args.actors, args.flower_python, Path(tmp), write)
    write(cells)
    print(args.out.read_text())
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
