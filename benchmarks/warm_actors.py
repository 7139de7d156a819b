"""Several runs from one process: cold client actors every run against warm ones
(:func:`fedbip_ray.reuse_actors`).

Each model gets the same sequence of small federations (the performance benchmark's quick
config of that model, 1 round; strategies fedbip, fedavg, fedbip) twice in one driver process
on the 2-CPU embedded local Ray: first each run on new actors, then inside ``reuse_actors``.
The table gives each run's wall seconds and, for runs 2.., warm / cold. The last column checks
that the warm sequence's results are the cold one's (equal per-client test accuracies).

Usage::

    python benchmarks/warm_actors.py [--models tiny-bert,minilm]
        [--out benchmarks/results/warm_actors.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf.machine import machine_line  # noqa: E402
from benchmarks.perf.presets import model_config  # noqa: E402

DEFAULT_OUT = Path("benchmarks/results/warm_actors.md")
STRATEGIES = ("fedbip", "fedavg", "fedbip")


def sequence(model: str) -> list[dict[str, Any]]:
    """The configs of one model's sequence (1 round each, one strategy per run)."""
    base = model_config(model, quick=True)
    base["federation"]["rounds"] = 1
    runs = []
    for name in STRATEGIES:
        cfg = copy.deepcopy(base)
        cfg["strategy"] = {"name": name}
        runs.append(cfg)
    return runs


def timed_runs(configs: list[dict[str, Any]], root: Path) -> list[tuple[float, dict]]:
    """(wall seconds, per-client test accuracy) of each run, one after the other."""
    from fedbip_ray import api

    out = []
    for i, cfg in enumerate(configs):
        t0 = time.perf_counter()
        summary = api.run(cfg, root / f"run{i}")
        out.append((time.perf_counter() - t0, summary["per_client_accuracy"]))
    return out


def table(model: str, cold: list[tuple[float, dict]], warm: list[tuple[float, dict]]) -> list[str]:
    """Markdown rows of one model."""
    rows = []
    for i, ((c, acc_c), (w, acc_w)) in enumerate(zip(cold, warm, strict=True)):
        ratio = f"{w / c:.2f}" if i else "(first run)"
        rows.append(f"| {model} | {i + 1} ({STRATEGIES[i]}) | {c:.1f} | {w:.1f} | {ratio} | "
                    f"{'yes' if acc_c == acc_w else 'NO'} |")
    later_c = sum(c for c, _ in cold[1:])
    later_w = sum(w for w, _ in warm[1:])
    rows.append(f"| {model} | runs 2-{len(cold)} | {later_c:.1f} | {later_w:.1f} | "
                f"{later_w / later_c:.2f} | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-bert,minilm")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from fedbip_ray import api

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    lines = ["# Warm client actors between runs of one process", "",
             f"Command: `python benchmarks/warm_actors.py --models {args.models}`", "",
             machine_line(), "",
             "| model | run | cold s | warm s | warm / cold | same accuracies |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            configs = sequence(model)
            cold = timed_runs(configs, Path(tmp) / model / "cold")
            with api.reuse_actors():
                warm = timed_runs(configs, Path(tmp) / model / "warm")
            lines += table(model, cold, warm)
            print("\n".join(lines[-len(configs) - 1:]), flush=True)
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
