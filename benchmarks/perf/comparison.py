"""The overhead and Flower runs: every (model, runner) pair on shared shards."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.perf.common import Run, digest, log, with_retries
from benchmarks.perf.fedbip_run import fedbip_run
from benchmarks.perf.floor import floor_run
from benchmarks.perf.flower import flower_run
from benchmarks.perf.fmt import brief
from benchmarks.perf.presets import Workload, model_config, prepare_shards, warm_model_cache


def _run_one(runner: str, wl: Workload, args: argparse.Namespace) -> Run:
    """One runner (floor, fedbip or flower-VARIANT) on one workload, retried as ``--retries``."""
    model, cfg, shards, wdir = wl.model, wl.config, wl.shards, wl.work
    if runner == "floor":
        return with_retries(args.retries, floor_run, model, cfg, shards, wl.num_labels, wdir,
                            args.cpus)
    if runner == "fedbip":
        run = with_retries(args.retries, fedbip_run, model, cfg, wdir, args.inprocess)
        if not run.error and run.extra.get("shards_digest") != digest(shards):
            run.extra["shards_differ"] = True
        return run
    return with_retries(args.retries, flower_run, model, runner.removeprefix("flower-"), cfg,
                        shards, wl.num_labels, wdir, args.cpus, args.flower_python)


def comparison_runs(models: Sequence[str], runners_for: Callable[[str], Sequence[str]],
                    args: argparse.Namespace, work: Path,
                    cache: dict[tuple[str, str], Run]) -> None:
    """Run every (model, runner) pair not yet in ``cache`` (floor, fedbip, flower-*)."""
    for model in models:
        wanted = [r for r in runners_for(model) if (model, r) not in cache]
        if not wanted:
            continue
        cfg = model_config(model, args.quick)
        if args.rounds:
            cfg["federation"]["rounds"] = args.rounds
        wdir = work / model
        wdir.mkdir(parents=True, exist_ok=True)
        warm_model_cache(model)
        shards, num_labels, secs = prepare_shards(cfg, wdir / "shards")
        wl = Workload(model, cfg, shards, num_labels, secs, wdir)
        for runner in wanted:
            log(f"[{model}] {runner} ...")
            run = _run_one(runner, wl, args)
            run.extra["workload"] = dataclasses.asdict(wl) | {"work": str(wdir)}
            cache[(model, runner)] = run
            log(f"[{model}] {runner}: {brief(run)}")
