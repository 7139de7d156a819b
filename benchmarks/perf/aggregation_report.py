"""Section 4, reported: the aggregation table and what it shows."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.perf.aggregation import AggRow, allocation_ratios
from benchmarks.perf.common import GIB, MIB
from benchmarks.perf.fmt import fmt_bytes, fmt_num, fmt_ratio
from benchmarks.perf.machine import total_memory

BIG = 1000 * 1_000_000 * 4  # M at N = 1000, D = 1e6
HEADER = [
    "| N | D | strategy | M | aggregate_refs (s) | allocations during call | / M "
    "| actor USS before -> peak | need: store + kept arrays + allocations | / M "
    "| all processes peak (PSS) | fits in machine memory |",
    "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]
WHERE = (
    "Where the allocations come from (`FederatedServer.aggregate` and the strategies, "
    "read from the code): `np.stack(vecs)` of the received task vectors (1 M); the "
    "strategy's new states (1 M: `W @ deltas + states` for FedBip, `np.repeat` of the "
    "average for FedAvg); the finiteness check runs in blocks of 64 rows (no N x D "
    "bool array). The participants' states are passed as a view when they are "
    "contiguous (a copy, 1 M, otherwise), and strategies that compare parameters "
    "(`reference: pretrained`, `lora_product`) form theta = states + deltas one column "
    "block at a time, not as an N x D copy. The N updates stay in the object store (1 "
    "M, read zero-copy), the server's states are another M. The server keeps the last "
    "round's stacked task vectors until the next aggregation only when a replay "
    "recorder asks for them (`keep_last_round`: 1 M more between rounds, not measured "
    "here). With the validation gate on (not measured here) the server also keeps each "
    "participant's own-training state until the gate has run (1 M)."
)


def _intro(total: int) -> str:
    """How the section measures (``total``: the machine's memory in bytes)."""
    return ("N client updates ((D,) float32 task vectors in `ClientUpdate` messages) are produced "
            "by Ray tasks into the object store, as client actors produce them, and their "
            "ObjectRefs are handed to `ServerActor.aggregate_refs` (fetch, validate, "
            "`FederatedServer.aggregate`: stack, strategy, write back), as the round loop does. "
            "Time: the call without tracing. Memory (a second call, new updates): allocations made "
            "during the call by tracemalloc inside the actor; the numpy arrays the server object "
            "keeps from before the call (its states, the previous round's task vectors); the "
            "actor's private memory (USS) before and at peak (it includes freed memory the "
            "allocator keeps, which dominates at small sizes); PSS of all processes (the benchmark "
            "process, Ray's processes, the object store holding the N updates). M = N x D x 4 "
            "bytes = one stacked matrix of task vectors (and the size of the server's states). "
            f"Machine memory: {total / GIB:.1f} GiB.")


def _row(r: AggRow, total: int) -> str:
    """One case of the table (a skipped or failed case says why)."""
    if r.skipped:
        verdict = "no (predicted)" if r.skipped.startswith("skipped") else "no (failed)"
        return (f"| {r.n} | {r.d:,} | {r.strategy} | {fmt_bytes(r.matrix)} | {r.skipped} | "
                f"| | | | | | {verdict} |")
    fits = "yes" if r.total_pss_peak and r.total_pss_peak < total else "no"
    return (f"| {r.n} | {r.d:,} | {r.strategy} | {fmt_bytes(r.matrix)} | {fmt_num(r.seconds)} | "
            f"{fmt_bytes(r.traced_peak)} | {fmt_ratio(r.traced_peak, r.matrix)} | "
            f"{fmt_bytes(r.actor_uss_before)} -> {fmt_bytes(r.actor_uss_peak)} | "
            f"{fmt_bytes(r.need)} | {fmt_ratio(r.need, r.matrix)} | "
            f"{fmt_bytes(r.total_pss_peak)} | {fits} |")


def _summary(rows: Sequence[AggRow], strategy: str, total: int) -> list[str]:
    """What the measured cases of ``strategy`` show, and what they predict at N = 1000, D = 1e6."""
    measured, ratios, flat = allocation_ratios(rows, strategy)
    if not measured:
        return []
    kept = [(r.held_before or 0) / r.matrix for r in measured]
    need = (measured[-1].need or 0) / measured[-1].matrix
    verdict = ("constant across sizes, so memory is linear in N x D: no N^2 copies of task "
               "vectors" if flat else
               "NOT constant across sizes: look for copies that grow faster than N x D")
    return ["", f"**{strategy}**: allocations per M across (N, D) = "
                f"{', '.join(f'({r.n}, {r.d:g})' for r in measured)}: "
                f"{', '.join(f'{x:.2f}' for x in ratios)} -- {verdict} (the N x N "
                "similarity/weight matrices are N^2 x 8 bytes, "
                f"{measured[-1].n ** 2 * 8 / MIB:.1f} MiB at N={measured[-1].n}). Between "
                "rounds the server keeps numpy arrays of "
                f"{', '.join(f'{x:.2f}' for x in kept)} x M (its states and what it keeps from "
                "the last round); the actor's baseline is "
                f"{fmt_bytes(measured[-1].actor_base)}. At N = 1000, D = 1e6 (M = "
                f"{fmt_bytes(BIG)}) the largest measured case predicts {need:.2f} x M = "
                f"{fmt_bytes(need * BIG)} (object store + kept arrays + the call's "
                "allocations), plus the baselines of the actor and Ray's own processes (~1 "
                f"GiB), against {total / GIB:.1f} GiB of machine memory."]


def aggregation_section(rows: Sequence[AggRow]) -> list[str]:
    """Section 4: the table of cases, the summary per strategy, where the allocations come from."""
    total = total_memory()
    out = ["## 4. Server-side aggregation at scale (inside a real ServerActor)", "",
           _intro(total), "", *HEADER]
    out += [_row(r, total) for r in rows]
    for strategy in dict.fromkeys(r.strategy for r in rows):
        out += _summary(rows, strategy, total)
    threads = next((r.threads for r in rows if r.threads), None)
    if threads:
        out += ["", f"The server actor (`num_cpus=0`) runs numpy with {threads}."]
    out += ["", WHERE, ""]
    return out
