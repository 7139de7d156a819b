"""Performance and scale benchmark of fedbip-ray.

Sections (``--sections``, default: all):

* ``overhead``: round wall time of a fedbip-ray FedAvg run against the compute floor of the
  same work: the same local training and evaluation (``make_trainer``, i.e. ``SequenceTrainer``
  for sequence classification, on the same Parquet shards) in plain worker processes
  (multiprocessing, the same parallelism and torch threads, the model loaded once per worker,
  no framework). Models ``tiny-bert`` and ``minilm``.
* ``flower``: the same work under Flower 1.42's simulation engine (``run_simulation``,
  ServerApp + ClientApp, FedAvg, client ``num_cpus=1``), run from its own venv
  (``benchmarks/flower_baseline/``), side by side with fedbip-ray: per-round times, whole-run
  wall time including start-up, peak memory of all processes. Models ``minilm`` and
  ``smollm2`` (SmolLM2-135M-Instruct, ``model.task: causal-lm``, instruction tasks).
* ``pool``: a fixed number of client actors serve N = 8 ... 512 clients (tiny-bert, a fixed
  number of clients per round): round time and peak memory against N.
* ``aggregation``: ``FederatedServer.aggregate`` inside a real ``ServerActor`` at N x D up to
  1000 x 1e6: time, allocations made by the call (tracemalloc inside the actor), private memory
  of the actor and memory of all processes (the task vectors sit in Ray's object store).
* ``bytes``: bytes per round from ``metrics.jsonl`` (``bytes_in``/``bytes_out``) of the fedbip
  runs above against the minimum 2 x participating clients x D x 4.

Every process-level figure comes from one sampler (:class:`TreeMemorySampler`: PSS summed over
the process tree, sampled by a psutil thread) and one clock definition (a round ends when its
evaluation ends; a round's time is the time since the previous round ended, the first round
counting from when the clients were ready).

Usage::

    python benchmarks/performance.py [--quick] [--sections overhead,flower,pool,aggregation,bytes]
        [--out benchmarks/results/performance.md]
    fedbip bench performance [ARGS]

``--quick`` runs tiny sizes (CI smoke run; no file is written unless ``--out`` is given).
``main(argv)`` is what ``fedbip bench performance`` calls. Each section lives in its own module
of ``benchmarks/perf/``; this file is the entry point (and the measured children's command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf.aggregation import aggregation_rows  # noqa: E402
from benchmarks.perf.cli import parse_args  # noqa: E402
from benchmarks.perf.common import CHILD_ENV, DEFAULT_OUT, log, write_json  # noqa: E402
from benchmarks.perf.comparison import comparison_runs  # noqa: E402
from benchmarks.perf.fedbip_run import fedbip_child  # noqa: E402
from benchmarks.perf.floor import floor_child  # noqa: E402
from benchmarks.perf.flower import flower_runners  # noqa: E402
from benchmarks.perf.measure import TreeMemorySampler  # noqa: E402
from benchmarks.perf.pool import pool_runs  # noqa: E402
from benchmarks.perf.report import (  # noqa: E402
    Results,
    command_line,
    load_reused,
    raw_results,
    report,
)
from fedbip_ray.runtime.rows import sample_clients  # noqa: E402

__all__ = ["TreeMemorySampler", "main", "sample_clients"]


def run_sections(args: argparse.Namespace, work: Path, res: Results) -> None:
    """Run the selected sections into ``res`` (comparison runs already in it are kept)."""
    secs = set(args.sections)
    if "overhead" in secs:
        comparison_runs(args.overhead_models, lambda m: ["floor", "fedbip"], args, work, res.cache)
    if "flower" in secs:
        comparison_runs(args.flower_models,
                        lambda m: ["fedbip", *flower_runners(m, args.flower_variants)],
                        args, work, res.cache)
    if "pool" in secs:
        res.pool = pool_runs(args, work)
    if "aggregation" in secs:
        res.agg = aggregation_rows(args.agg_cases, args.agg_strategies, args.agg_force)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections; print the report and write it to ``--out``. Returns 0 (2 when
    ``--reuse`` names a file that is not this benchmark's JSON)."""
    args = parse_args(argv)
    if args.run_fedbip:
        return fedbip_child(args.run_fedbip)
    if args.run_floor:
        return floor_child(args.run_floor)
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    out_path = args.out if args.out is not None or args.quick else DEFAULT_OUT
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedbip-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res, reused = Results(), {}
    if args.reuse is not None:
        try:
            res, reused = load_reused(args.reuse, args)
        except (OSError, ValueError, TypeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"--reuse {args.reuse}: not a readable --json file of this benchmark "
                  f"({type(exc).__name__}: {first})", file=sys.stderr)
            return 2
    try:
        run_sections(args, work, res)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    command = command_line(argv)
    text = report(args, command, res, reused, time.perf_counter() - t_start)
    print(text)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
        log(f"wrote {out_path}")
    if args.json is not None:
        write_json(args.json, raw_results(args, command, res, reused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
