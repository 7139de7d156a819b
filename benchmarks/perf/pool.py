"""Section 3: many clients on a fixed pool of client actors."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.perf.common import MIB, Run, log, with_retries
from benchmarks.perf.fedbip_run import fedbip_run
from benchmarks.perf.fmt import brief, fmt_num, fmt_ratio, gib
from benchmarks.perf.presets import pool_config


def pool_runs(args: argparse.Namespace, work: Path) -> list[Run]:
    """Pool mode: one fedbip run per N."""
    runs = []
    for n in args.pool_n:
        cfg = pool_config(n, args.pool_per_round, args.pool_rounds, args.pool_actors)
        wdir = work / f"pool-{n}"
        wdir.mkdir(parents=True, exist_ok=True)
        log(f"[pool] N={n} ...")
        run = with_retries(args.retries, fedbip_run, f"pool-{n}", cfg, wdir, args.inprocess)
        run.extra["num_clients"] = n
        run.extra["per_round"] = min(args.pool_per_round, n)
        run.extra["actors"] = args.pool_actors
        runs.append(run)
        log(f"[pool] N={n}: {brief(run)}")
    return runs


def pool_section(runs: Sequence[Run]) -> list[str]:
    """Section 3: round time and peak memory against N."""
    out = ["## 3. Many clients on a fixed pool of actors", "",
           "fedbip dispatches clients to a fixed set of client actors (`resources.max_actors`; "
           "client c's home actor is c mod A, a free actor also takes clients queued for a busy "
           "one, `federation.dispatch`); every actor holds the base model once and receives each "
           "client's adapter state from the server actor with every call, so N only adds "
           "server-side states (N x D float32), per-client shards in the object store and each "
           "actor's cache of its clients' tokenized data. tiny-bert (LoRA + classifier, D below), "
           "7 synthetic examples per client, a fixed number of clients per round; only the last "
           "round evaluates, and it evaluates all N clients.", "",
           "| N clients | actors | clients per round | train rounds (s) "
           "| steady train round, rounds 2..R-1 (s) | last round: train + evaluate all N (s) "
           "| eval s per client | whole run (s) | peak memory, all processes (GiB PSS) "
           "| processes at peak | server states N x D x 4 (MiB) |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        n = r.extra.get("num_clients")
        if r.error:
            out.append(f"| {n} | FAILED: {r.error} | | | | | | | | | |")
            continue
        train = r.rounds[:-1]
        steady = float(np.mean(train[1:])) if len(train) > 1 else (train[0] if train else math.nan)
        last = r.rounds[-1] if r.rounds else math.nan
        per_eval = (last - steady) / n if n and not math.isnan(steady) else math.nan
        dim = r.extra.get("dim")
        states = n * dim * 4 / MIB if dim else None
        out.append(
            f"| {n} | {r.extra.get('actors')} | {r.extra.get('per_round')} | "
            f"{' / '.join(f'{t:.2f}' for t in train)} | {steady:.2f} | {last:.2f} | {per_eval:.4f} "
            f"| {fmt_num(r.whole, '.1f')} | {gib(r.peak_pss)} | {r.peak_procs} | "
            f"{fmt_num(states, '.2f')} |")
    ok = [r for r in runs if not r.error]
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        out += ["", f"Peak memory from N={lo.extra['num_clients']} to N={hi.extra['num_clients']}: "
                    f"{gib(lo.peak_pss)} -> {gib(hi.peak_pss)} GiB "
                    f"({fmt_ratio(hi.peak_pss, lo.peak_pss)}). D = {hi.extra.get('dim')}."]
    out.append("")
    return out
