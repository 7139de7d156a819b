"""Section 1: orchestration overhead of fedbip-ray against the compute floor."""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.perf.common import Run
from benchmarks.perf.fmt import describe, fmt_goal, peak_lines, run_table


def overhead_section(cache: dict[tuple[str, str], Run], models: Sequence[str]) -> list[str]:
    """Section 1: per model, the floor and fedbip side by side, and the steady-state ratio."""
    out = ["## 1. Orchestration overhead: fedbip-ray against the compute floor", "",
           "Floor = the same local training and evaluation (`make_trainer` -> `SequenceTrainer`, "
           "the same Parquet shards, the same seeds) in plain `multiprocessing` worker processes, "
           "as many as fedbip starts client actors, each with the torch thread count Ray gives an "
           "actor (`OMP_NUM_THREADS = num_cpus`), the model loaded once per worker, clients dealt "
           "to workers as fedbip dispatches them to actors (one client in flight per worker; a "
           "free worker takes its own next client, c mod W, longest first by the client's last "
           "call of the phase, else the cheapest one queued for the worker with the most work "
           "left), FedAvg in the parent. fedbip rounds include aggregation in the server actor, "
           "moving states and task vectors through the object store, metrics.jsonl and the "
           "per-round checkpoint.", ""]
    for model in models:
        floor, fed = cache.get((model, "floor")), cache.get((model, "fedbip"))
        if floor is None or fed is None:
            continue
        cfg = (fed.extra.get("workload", {}).get("config")
               or floor.extra.get("workload", {}).get("config"))
        out += [f"### {model}", "", f"Work: {describe(cfg)}." if cfg else "", ""]
        out += run_table([floor, fed], floor, "floor")
        out += ["", *peak_lines([floor, fed])]
        if not floor.error and not fed.error:
            ratio = fed.steady / floor.steady
            out += ["", f"Steady-state overhead: {fed.steady - floor.steady:+.2f} s per round; "
                        f"ratio {fmt_goal(ratio, 1.05)}. D = {floor.extra.get('dim')} trainable "
                        f"values; floor workers {floor.extra.get('workers')} with torch threads "
                        f"{floor.extra.get('torch_threads')}."]
            if fed.extra.get("shards_differ"):
                out.append("WARNING: fedbip's shards differ from the ones the floor read.")
        out.append("")
    return out
