"""Driver-side cost of one round's outputs as the participants grow.

For N participants with a small task-vector size D, the server aggregates one round (fedbip,
4 true groups) into a temporary output; what the driver then handles is measured: the report's
pickled size (what Ray ships from the server actor), the metrics row's JSON size, the seconds
of ``RunOutputs.record_round`` and of building the round's MLflow metric batch, and the number
of metrics in it. For comparison, the bytes the two (N, N) float64 matrices alone would take in
the report if the server still sent them.

    python benchmarks/scale_outputs.py [--sizes 8 256 2000] [--dim 64]
        [--out benchmarks/results/scale_outputs.md]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedbip_ray.core.taskvector import Layout  # noqa: E402
from fedbip_ray.runtime.messages import ClientUpdate, ServerSettings  # noqa: E402
from fedbip_ray.runtime.outputs import RunOutputs  # noqa: E402
from fedbip_ray.runtime.rows import round_row  # noqa: E402
from fedbip_ray.runtime.server import FederatedServer  # noqa: E402
from fedbip_ray.tracking.run_info import PER_CLIENT_LIMIT, row_metrics  # noqa: E402

GROUPS = 4


def one_round(n: int, dim: int, out: RunOutputs) -> dict[str, float]:
    """Aggregate one round of ``n`` grouped updates and measure the driver's side of it."""
    from mlflow.entities import Metric

    layout = Layout.from_shapes({"w": (dim,)})
    rng = np.random.default_rng(n)
    centers = rng.standard_normal((GROUPS, dim)).astype(np.float32)
    groups = [i % GROUPS for i in range(n)]
    ups = [ClientUpdate(i, 1, centers[g] + 0.1 * rng.standard_normal(dim).astype(np.float32),
                        layout, 10) for i, g in enumerate(groups)]
    srv = FederatedServer(ServerSettings.of("fedbip", {}, n, groups, output=out.location))
    srv.initialize(np.zeros(dim, dtype=np.float32), layout)
    report = srv.aggregate(1, ups)
    evals = {c: {"val": {"accuracy": 0.5}, "test": {"accuracy": float(rng.random()), "loss": 1.0}}
             for c in range(n)}
    row = round_row(1, evals, report, list(range(n)), [], 1.0)
    t0 = time.perf_counter()
    out.record_round(row, report)
    t_record = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = row_metrics(row, [row], PER_CLIENT_LIMIT)
    batch = [Metric(k, v, 0, 1) for k, v in values.items()]
    t_metrics = time.perf_counter() - t0
    npz = out.location / report.summary.file if report.summary and report.summary.file else None
    return {"n": n, "report_bytes": len(pickle.dumps(report)),
            "row_bytes": len(json.dumps(row)), "record_s": t_record, "metrics_s": t_metrics,
            "metrics": len(batch), "full_matrices_bytes": 2 * 8 * n * n,
            "npz_bytes": npz.info().size if npz is not None else 0}


def table(results: list[dict[str, float]], dim: int) -> str:
    lines = [
        "# Per-round driver-side outputs vs participants",
        "",
        f"One aggregated round, fedbip, {GROUPS} true groups, D={dim}; "
        f"`python benchmarks/scale_outputs.py` on {platform.machine()}, Python "
        f"{platform.python_version()}. The server actor writes the (N, N) matrices to "
        "`similarity/round_XXXXX.npz` itself; the report carries them only up to 64 "
        "participants, always a top-8 neighbour summary and a <= 64x64 block view.",
        "",
        "| N | report pickle (bytes) | would-be full matrices in report (bytes) | metrics row "
        "(bytes) | record_round (s) | MLflow metric batch build (s) | metrics per round | "
        "npz written by the server (bytes) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['n']} | {r['report_bytes']:,} | {r['full_matrices_bytes']:,} | "
                     f"{r['row_bytes']:,} | {r['record_s']:.4f} | {r['metrics_s']:.4f} | "
                     f"{r['metrics']} | {r['npz_bytes']:,} |")
    big, mid = results[-1], results[-2] if len(results) > 1 else results[-1]
    lines += ["", f"Report size ratio N={big['n']} / N={mid['n']}: "
              f"{big['report_bytes'] / mid['report_bytes']:.1f} (N ratio "
              f"{big['n'] / mid['n']:.1f}, N^2 ratio {(big['n'] / mid['n']) ** 2:.1f}); row "
              f"size ratio {big['row_bytes'] / mid['row_bytes']:.1f}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 256, 2000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/scale_outputs.md")
    args = ap.parse_args()
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(one_round(n, args.dim, RunOutputs.open(Path(tmp) / "run")))
    text = table(results, args.dim)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
