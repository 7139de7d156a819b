"""fedbip-ray runs: one federation through ``run_federation`` in a measured child (or in this
process), timed by a round clock."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.perf.common import Run, digest, fail_run, log_tail, write_json
from benchmarks.perf.measure import TreeMemorySampler, round_times, run_entry, top_processes


class RoundClock:
    """fedbip ``RunCallback`` recording when the clients were ready and when each round ended
    (after its evaluation and checkpoint)."""

    def __init__(self) -> None:
        self.start = math.nan
        self.ends: list[float] = []

    def on_start(self, run: Any) -> None:
        """The clients are ready: round 1 starts now."""
        self.start = time.perf_counter()

    def on_round(self, run: Any, row: Any, report: Any) -> None:
        """A round ended (its evaluation and checkpoint request are done)."""
        self.ends.append(time.perf_counter())

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        """Nothing to record at the end of the run."""


def fedbip_child(job_path: str) -> int:
    """``--run-fedbip JOB``: one federation through ``run_federation`` (what ``fedbip run``
    calls), with a round clock; writes ``job["result"]``."""
    job = json.loads(Path(job_path).read_text())
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.runtime.federation import run_federation

    cfg = config_from_dict(job["config"])
    clock = RoundClock()
    summary = run_federation(cfg, job["output"], callbacks=[clock], echo=lambda s: None)
    write_json(Path(job["result"]), {"start": clock.start, "ends": clock.ends, "summary": summary})
    return 0


def fedbip_phases(rows: Sequence[dict[str, Any]], times: Sequence[float]) -> list[dict[str, float]]:
    """Per-round split of fedbip's round time, from metrics.jsonl (``extra.*_seconds``) in the
    floor's terms: fit, aggregate, evaluate (validation gate included), and ``other`` = the
    round clock minus those (metrics line, checkpoint request, callbacks, the driver)."""
    out = []
    for row, total in zip(rows, times, strict=False):
        ex = row.get("extra", {})
        if "fit_seconds" not in ex:
            return []  # written by an older fedbip
        split = {"fit": ex["fit_seconds"], "aggregate": ex.get("aggregate_seconds", 0.0),
                 "evaluate": ex.get("gate_seconds", 0.0) + ex.get("eval_seconds", 0.0)}
        split["other"] = total - sum(split.values())
        out.append(split)
    return out


def checkpoint_dim(output: Path) -> int | None:
    """D from the latest checkpoint's ``states`` tensor (None if not found)."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    for path in sorted((output / "checkpoints").rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as fh:
                if "states" in fh.keys():
                    return int(fh.get_slice("states").get_shape()[1])
        except Exception:  # noqa: BLE001 - another layout: fall back
            continue
    return None


def fedbip_run(workload: str, cfg_dict: dict[str, Any], work: Path, inprocess: bool) -> Run:
    """Run one fedbip federation (subprocess unless ``inprocess``) and collect its figures."""
    out = work / "fedbip-output"
    shutil.rmtree(out, ignore_errors=True)
    result = work / "fedbip-result.json"
    job = write_json(work / "fedbip-job.json",
                     {"config": cfg_dict, "output": str(out), "result": str(result)})
    if inprocess:
        from fedbip_ray.runtime.cluster import ensure_ray

        ensure_ray()
        with TreeMemorySampler(os.getpid()) as sampler:
            try:
                rc = fedbip_child(str(job))
            except Exception as exc:  # noqa: BLE001 - reported in the table
                return fail_run("fedbip", workload, f"{type(exc).__name__}: {exc}"[:300])
        wall, log = math.nan, None
    else:
        log = work / "fedbip.log"
        rc, wall, sampler = run_entry("--run-fedbip", job, log)
    if rc != 0 or not result.is_file():
        return fail_run("fedbip", workload, f"exit {rc}: {log_tail(log) if log else ''}", wall)
    res = json.loads(result.read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    acc = res["summary"].get("mean_accuracy")
    times = round_times(res["start"], res["ends"])
    shards = sorted((out / "shards").glob("client_*.parquet"))
    return Run("fedbip", workload, times, wall, sampler.peak, sampler.peak_procs, acc,
               extra={"metrics": rows, "peak_top": top_processes(sampler.peak_top),
                      "phases": fedbip_phases(rows, times), "dim": checkpoint_dim(out),
                      "shards_digest": digest(shards),
                      "num_clients": cfg_dict["data"]["num_clients"]})
