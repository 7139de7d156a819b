"""Benchmark of the FedBip aggregation core path (similarity + weights + aggregation).

Compares ``make_strategy("fedbip").aggregate`` on stacked ``(N, D)`` float32 matrices against

* **loop**: a straightforward per-pair Python loop over per-client dicts of ~20 named layers
  (cosine for each pair ``(i, k)`` by iterating over layers, then a weighted sum by iterating
  over layers), the way a state-dict based implementation is usually written; cases whose
  extrapolated time exceeds ``--loop-budget`` seconds are skipped and reported as estimates;
* **floor**: the memory-bandwidth floor, two full reads of the ``(N, D)`` float32 matrix
  (two BLAS matrix-vector products), measured in the same run.

Usage::

    python benchmarks/aggregation.py [--quick] [--out benchmarks/results/aggregation.md]

``main(argv)`` is importable for the ``fedbip bench`` command. ``--quick`` uses tiny sizes
(a few seconds) and writes a file only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbip_ray.core.strategies import AggregationInput, make_strategy
from fedbip_ray.core.taskvector import Layout

FULL_N = (8, 64, 256)
FULL_D = (100_000, 1_000_000)
QUICK_N = (4, 16)
QUICK_D = (2_000, 20_000)
N_LAYERS = 20
DEFAULT_OUT = Path("benchmarks/results/aggregation.md")
MIB = 1024 * 1024


@dataclass
class Row:
    """One benchmark case (times in seconds, memory in MiB)."""

    n: int
    d: int
    ours: float
    floor: float
    ours_peak_mib: float
    output_mib: float
    loop: float | None  # measured
    loop_estimate: float | None  # extrapolated when skipped
    max_abs_diff: float | None


def make_layout(d: int, n_layers: int = N_LAYERS) -> Layout:
    """``n_layers`` LoRA-like 1-D parameters that together hold ``d`` values."""
    sizes = [d // n_layers + (1 if j < d % n_layers else 0) for j in range(n_layers)]
    names = [
        f"layer.{j // 2}.attention.{'query' if j % 4 < 2 else 'value'}.lora_{'AB'[j % 2]}"
        f".default.weight"
        for j in range(n_layers)
    ]
    return Layout.from_shapes({name: (size,) for name, size in zip(names, sizes, strict=True)})


def as_dicts(m: np.ndarray, layout: Layout) -> list[dict[str, np.ndarray]]:
    """Per-client ``{layer name: view}`` dicts (no copies) of an ``(N, D)`` matrix."""
    return [{name: row[layout.index(name)] for name in layout.names} for row in m]


def loop_aggregate(
    states: list[dict[str, np.ndarray]], deltas: list[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Reference FedBip step written as nested Python loops over clients and layers."""
    n = len(deltas)
    names = list(deltas[0])
    sq_norms = [
        sum(float(np.vdot(deltas[i][name], deltas[i][name])) for name in names) for i in range(n)
    ]
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for k in range(n):
            dot = 0.0
            for name in names:
                dot += float(np.vdot(deltas[i][name], deltas[k][name]))
            denom = math.sqrt(sq_norms[i] * sq_norms[k])
            sim[i][k] = dot / denom if denom > 0 else 0.0
    out = []
    for i in range(n):
        row = [1.0 if k == i else max(sim[i][k], 0.0) for k in range(n)]
        total = sum(row)
        new = {}
        for name in names:
            acc = states[i][name].copy()
            for k in range(n):
                if row[k] != 0.0:
                    acc += np.float32(row[k] / total) * deltas[k][name]
            new[name] = acc
        out.append(new)
    return out


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during ``fn`` beyond what was live before (tracemalloc, MiB)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - before) / MIB


def run_case(
    n: int, d: int, *, repeats: int, loop_estimate: float | None, loop_budget: float
) -> Row:
    """Time ours, the floor and (unless estimated above budget) the loop for one size."""
    rng = np.random.default_rng(n * 7919 + d)
    layout = make_layout(d)
    states = rng.standard_normal((n, d), dtype=np.float32)
    deltas = rng.standard_normal((n, d), dtype=np.float32)
    deltas += rng.standard_normal((1, d), dtype=np.float32)  # shared direction: positive cosines
    counts = np.full(n, 100, dtype=np.int64)
    # the same computation as the loop: cosine of per-round task vectors, clipped weights
    strategy = make_strategy("fedbip", {"reference": "round", "lora_product": False,
                                        "threshold": None, "relative_threshold": False,
                                        "self_similarity": "one"})

    def ours() -> np.ndarray:
        inp = AggregationInput(states=states, deltas=deltas, counts=counts, layout=layout)
        return strategy.aggregate(inp).states

    ones = np.ones(d, dtype=np.float32)

    def floor() -> None:
        deltas @ ones
        deltas @ ones

    result = ours()  # warm-up (BLAS threads, page faults) and reference output
    floor()
    t_ours = median_time(ours, repeats)
    t_floor = median_time(floor, repeats)
    peak = peak_extra_mib(ours)

    t_loop: float | None = None
    diff: float | None = None
    if loop_estimate is None or loop_estimate <= loop_budget:
        st, de = as_dicts(states, layout), as_dicts(deltas, layout)
        t0 = time.perf_counter()
        loop_out = loop_aggregate(st, de)
        times = [time.perf_counter() - t0]
        if times[0] < 5.0 and repeats > 1:  # up to 3 runs while they are short
            times += [median_time(lambda: loop_aggregate(st, de), 1) for _ in range(2)]
        t_loop = statistics.median(times)
        diff = max(
            float(np.max(np.abs(loop_out[i][name] - result[i, layout.index(name)])))
            for i in range(n)
            for name in layout.names
        )
    return Row(
        n=n,
        d=d,
        ours=t_ours,
        floor=t_floor,
        ours_peak_mib=peak,
        output_mib=n * d * 4 / MIB,
        loop=t_loop,
        loop_estimate=None if t_loop is not None else loop_estimate,
        max_abs_diff=diff,
    )


def _fmt_s(t: float) -> str:
    return f"{t:.3g}"


def format_table(rows: Sequence[Row], loop_budget: float) -> str:
    """Markdown table of the results."""
    lines = [
        "| N | D | ours (s) | loop (s) | loop / ours | floor (s) | ours / floor "
        "| ours peak extra (MiB) | output (MiB) | max abs diff vs loop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.loop is not None:
            loop, ratio = _fmt_s(r.loop), f"{r.loop / r.ours:.0f}x"
        else:
            est = r.loop_estimate or float("nan")
            loop = f"~{est:.0f} (extrapolated; skipped, > {loop_budget:.0f} s)"
            ratio = f"~{est / r.ours:.0f}x"
        diff = "n/a" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        lines.append(
            f"| {r.n} | {r.d:,} | {_fmt_s(r.ours)} | {loop} | {ratio} | {_fmt_s(r.floor)} "
            f"| {r.ours / r.floor:.1f}x | {r.ours_peak_mib:.1f} | {r.output_mib:.1f} | {diff} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    """Platform, CPU count, Python/numpy versions and BLAS name."""
    blas = "unknown BLAS"
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]["name"]  # type: ignore[index]
    except Exception:  # informational only
        pass
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"os.cpu_count()={os.cpu_count()}, Python {platform.python_version()}, "
        f"numpy {np.__version__} ({blas})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown file (default {DEFAULT_OUT}; none with --quick)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument(
        "--loop-budget", type=float, default=60.0, help="skip loop cases estimated above this"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and write it to ``--out``. Returns 0."""
    args = parse_args(argv)
    ns, ds = (QUICK_N, QUICK_D) if args.quick else (FULL_N, FULL_D)
    repeats = args.repeats or (3 if args.quick else 5)
    out = args.out if args.out is not None or args.quick else DEFAULT_OUT
    rows: list[Row] = []
    for d in ds:
        last: tuple[int, float] | None = None  # (N, seconds) of the last measured loop
        for n in ns:
            estimate = None if last is None else last[1] * (n / last[0]) ** 2
            row = run_case(
                n, d, repeats=repeats, loop_estimate=estimate, loop_budget=args.loop_budget
            )
            if row.loop is not None:
                last = (n, row.loop)
            rows.append(row)
            print(f"N={n} D={d}: ours {row.ours:.4f}s floor {row.floor:.4f}s", file=sys.stderr)
    table = format_table(rows, args.loop_budget)
    command = "python benchmarks/aggregation.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    report = "\n".join(
        [
            "# FedBip aggregation benchmark",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine_line()}",
            "",
            "ours = `make_strategy('fedbip').aggregate` (similarity: one SYRK; weights; "
            "aggregation: one GEMM), float32. loop = per-pair Python loop over dicts of "
            f"{N_LAYERS} layers; loop times above the budget are extrapolated as N^2 from the "
            "largest measured N. floor = two reads of the (N, D) float32 matrix (two GEMV). "
            f"Median of {repeats} repeats (loop: up to 3). Peak extra memory by tracemalloc "
            "(numpy allocations, includes the (N, D) output).",
            "",
            table,
            "",
        ]
    )
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
