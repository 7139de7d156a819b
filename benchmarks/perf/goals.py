"""The goals table: each goal of the benchmark with the figures that decide it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.perf.aggregation import AggRow, allocation_ratios
from benchmarks.perf.bytes_moved import bytes_per_round
from benchmarks.perf.common import Run
from benchmarks.perf.fmt import fmt_num, gib
from benchmarks.perf.machine import cuda_device

Rows = list[tuple[str, str]]
Cache = dict[tuple[str, str], Run]


def ok(value: float, limit: float) -> str:
    """``value`` as a ratio against the goal ``limit``, met or not."""
    shown = f"{value:.3f}" if round(value, 2) == limit else f"{value:.2f}"  # 1.053 is not 1.05
    return f"{shown}x ({'met' if value <= limit else 'NOT met'})"


def _floor_rows(cache: Cache) -> Rows:
    """The overhead goal: fedbip against the compute floor."""
    over = [(m, fed.steady / floor.steady) for (m, runner), fed in cache.items()
            if runner == "fedbip" and (floor := cache.get((m, "floor")))
            and not fed.error and not floor.error]
    if not over:
        return []
    return [("steady rounds at most 1.05x the compute floor",
             "; ".join(f"{m} {ok(x, 1.05)}" for m, x in over))]


def _flower_rows(cache: Cache) -> Rows:
    """The goals against each Flower variant (rounds, whole run, memory; SmolLM2)."""
    flower = [(m, runner, fed, fl) for (m, runner), fl in cache.items()
              if runner.startswith("flower-") and (fed := cache.get((m, "fedbip")))
              and not fed.error and not fl.error]
    if not flower:
        return []
    rows = [(label, "; ".join(f"{m} vs {runner[len('flower-'):]} "
                              f"{ok(getattr(fed, key) / getattr(fl, key), limit)}"
                              for m, runner, fed, fl in flower))
            for label, key, limit in (("steady rounds no slower than Flower's", "steady", 1.0),
                                      ("whole run at most 0.9x Flower's", "whole", 0.9),
                                      ("peak memory at most 0.7x Flower's", "peak_pss", 0.7))]
    small = [(runner, fed, fl) for m, runner, fed, fl in flower if m == "smollm2"]
    if small:
        rows.append(("SmolLM2 steady round at most 0.5x Flower's", "; ".join(
            f"vs {runner[len('flower-'):]} {ok(fed.steady / fl.steady, 0.5)}"
            for runner, fed, fl in small)))
    return rows


def _pool_rows(pool: Sequence[Run]) -> Rows:
    """The pool-mode goals: memory flat in N, round time set by participants."""
    good = [r for r in pool if not r.error]
    if len(good) < 2:
        return []
    lo, hi = good[0], good[-1]
    grow = hi.peak_pss / lo.peak_pss
    train = [float(np.mean(r.rounds[1:-1])) for r in good if len(r.rounds) > 2]
    rows = [("pool mode: peak memory flat in N (at most 1.25x from the smallest to the "
             "largest N)",
             f"N={lo.extra['num_clients']} -> {hi.extra['num_clients']}: "
             f"{gib(lo.peak_pss)} -> {gib(hi.peak_pss)} GiB, {ok(grow, 1.25)}")]
    if train:
        rows.append(("pool mode: round time linear in participating clients",
                     f"{good[0].extra.get('per_round')} clients per round at every N: steady "
                     f"train round {min(train):.2f}-{max(train):.2f} s from "
                     f"N={lo.extra['num_clients']} to {hi.extra['num_clients']} (the last "
                     "round evaluates all N clients: see section 3)"))
    return rows


def _aggregation_rows(agg: Sequence[AggRow]) -> Rows:
    """Per strategy: no N^2 copies, and the largest case measured."""
    rows = []
    for strategy in dict.fromkeys(r.strategy for r in agg):
        done, ratios, flat = allocation_ratios(agg, strategy)
        if not done:
            continue
        biggest = max(done, key=lambda r: r.matrix)
        skipped = [f"N={r.n}, D={r.d:g} skipped "
                   f"({r.skipped.partition(': ')[2] or r.skipped})" for r in agg
                   if r.strategy == strategy and r.skipped]
        rows.append((f"aggregation ({strategy}) without N^2 copies, up to N = 1000, D = 1e6",
                     f"{'met' if flat else 'NOT met'}: allocations "
                     f"{min(ratios):.2f}-{max(ratios):.2f} x M; largest N={biggest.n}, "
                     f"D={biggest.d:g}: {fmt_num(biggest.seconds)} s, all processes "
                     f"{gib(biggest.total_pss_peak)} GiB"
                     + (f"; {'; '.join(skipped)}" if skipped else "")))
    return rows


def _bytes_rows(cache: Cache, pool: Sequence[Run]) -> Rows:
    """The bytes goal: the worst fedbip run against 2 x k x D x 4."""
    ratios = []
    for r in [*(r for (_, runner), r in cache.items() if runner == "fedbip"), *pool]:
        if not r.error and r.extra.get("metrics") and r.extra.get("dim"):
            _, b_in, b_out, minimum = bytes_per_round(r)
            ratios.append((b_in + b_out) / minimum)
    if not ratios:
        return []
    return [("bytes per round close to 2 x k x D x 4 (at most 1.05x)",
             f"{ok(max(ratios), 1.05)} at worst over {len(ratios)} runs")]


def goals_section(cache: Cache, pool: Sequence[Run], agg: Sequence[AggRow]) -> list[str]:
    """The goals of this benchmark, each with the figures below that decide it."""
    gpu = "the runs used CPU settings" if cuda_device() else "no GPU on this machine"
    rows = [*_floor_rows(cache), *_flower_rows(cache), *_pool_rows(pool),
            *_aggregation_rows(agg), *_bytes_rows(cache, pool),
            ("GPU throughput", "not measured: " + gpu)]
    out = ["## Goals", "", "| goal | result |", "|---|---|"]
    out += [f"| {goal} | {result} |" for goal, result in rows]
    out.append("")
    return out
