"""Section 5: bytes moved per round against the minimum."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.perf.common import Run
from benchmarks.perf.fmt import fmt_bytes, fmt_ratio


def bytes_per_round(r: Run) -> tuple[float, float, float, float | None]:
    """(participants k, bytes_in, bytes_out, minimum 2 x k x D x 4) per round, means over the
    run's metrics.jsonl rows."""
    rows, dim = r.extra["metrics"], r.extra.get("dim")
    k = float(np.mean([len(x.get("participants", [])) for x in rows]))
    b_in = float(np.mean([x.get("bytes_in", 0) for x in rows]))
    b_out = float(np.mean([x.get("bytes_out", 0) for x in rows]))
    return k, b_in, b_out, (2 * k * dim * 4 if dim else None)


def bytes_section(runs: Sequence[Run]) -> list[str]:
    """Section 5: per fedbip run, bytes in and out per round against the minimum."""
    out = ["## 5. Bytes moved per round", "",
           "From `metrics.jsonl`: `bytes_in` = task-vector bytes the server received, `bytes_out` "
           "= state bytes sent to the round's participants. Minimum = 2 x participating clients x "
           "D x 4 (each participant receives its state and returns its task vector, float32). D is "
           "read from the checkpoint's `states` tensor. Evaluation additionally sends every "
           "evaluated client's state (N_eval x D x 4, not in `bytes_out`); shown separately.", "",
           "| run | D | participating clients | bytes_in per round | bytes_out per round "
           "| in + out | minimum 2 x k x D x 4 | (in + out) / minimum "
           "| evaluation states per evaluated round |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r.error or not r.extra.get("metrics"):
            continue
        rows = r.extra["metrics"]
        dim = r.extra.get("dim")
        k, b_in, b_out, minimum = bytes_per_round(r)
        n_eval = [len(x.get("per_client_accuracy") or {}) for x in rows]
        evals = max(n_eval) * dim * 4 if dim and n_eval else None
        out.append(f"| {r.runner} {r.workload} | {dim} | {k:g} | {fmt_bytes(b_in)} | "
                   f"{fmt_bytes(b_out)} | {fmt_bytes(b_in + b_out)} | {fmt_bytes(minimum)} | "
                   f"{fmt_ratio(b_in + b_out, minimum)} | {fmt_bytes(evals)} |")
    out.append("")
    return out
