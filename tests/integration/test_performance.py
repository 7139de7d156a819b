"""CI miniature of ``benchmarks/performance.py``: the quick overhead, pool-mode, aggregation and
bytes sections on a real local Ray. Checks that the report is produced and sane, not timings."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest

from fedbip_ray.runtime.rows import sample_clients

from ..conftest import REPO

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def perf():
    """``benchmarks/performance.py`` loaded from its path, as ``fedbip bench`` loads it."""
    spec = importlib.util.spec_from_file_location("fedbip_bench_performance",
                                                  REPO / "benchmarks" / "performance.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_samples_clients_like_the_round_loop(perf):
    for n, k, seed, rnd in [(8, 8, 0, 1), (32, 8, 0, 3), (512, 8, 7, 2), (10, 3, 1, 9)]:
        assert perf.sample_clients(n, k, seed, rnd) == sample_clients(n, k, seed, rnd)


def test_memory_sampler_sees_child_processes(perf):
    code = "import time, numpy as np; a = np.ones(200 * 2**20 // 8); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with perf.TreeMemorySampler(proc.pid, interval=0.05) as sampler:
        proc.wait(timeout=60)
    assert sampler.samples >= 2
    assert sampler.peak >= 150 * 2**20  # the 200 MiB array, counted once
    assert sampler.peak_procs >= 1


def test_quick_report_is_produced_and_sane(perf, ray_local, tmp_path):
    out, raw = tmp_path / "performance.md", tmp_path / "performance.json"
    t0 = time.perf_counter()
    rc = perf.main(["--quick", "--inprocess", "--sections", "overhead,pool,aggregation,bytes",
                    "--agg-cases", "16x2e4", "--out", str(out), "--json", str(raw),
                    "--workdir", str(tmp_path / "work")])
    assert rc == 0
    assert time.perf_counter() - t0 < 300
    text = out.read_text()
    assert "Command: `python benchmarks/performance.py --quick --inprocess" in text
    for header in ("## 1. Orchestration overhead", "## 3. Many clients",
                   "## 4. Server-side aggregation", "## 5. Bytes moved per round", "## 6. GPU"):
        assert header in text
    assert "FAILED" not in text

    data = json.loads(raw.read_text())
    runs = {(r["workload"], r["runner"]): r for r in data["runs"]}
    floor, fed = runs[("tiny-bert", "floor")], runs[("tiny-bert", "fedbip")]
    for r in (floor, fed):
        assert r["error"] is None
        assert len(r["rounds"]) == 2 and all(0 < t < 120 for t in r["rounds"])
        assert r["peak_pss"] > 50 * 2**20 and 0 <= r["accuracy"] <= 1
    assert math.isfinite(floor["whole"]) and floor["whole"] > sum(floor["rounds"])
    assert fed["peak_procs"] >= 3  # the driver plus Ray's processes and actors
    assert abs(fed["accuracy"] - floor["accuracy"]) <= 0.15  # the same work
    assert floor["extra"]["dim"] == fed["extra"]["dim"] > 0
    assert floor["extra"]["torch_threads"] == [1, 1]
    # fedbip's round split (from metrics.jsonl) adds up to its round clock
    for split, total in zip(fed["extra"]["phases"], fed["rounds"], strict=True):
        assert set(split) == {"fit", "aggregate", "evaluate", "other"}
        assert min(split["fit"], split["aggregate"], split["evaluate"]) > 0
        assert sum(split.values()) == pytest.approx(total)
    assert "- fedbip, steady round split (s): fit" in text

    for n in (8, 32):
        pool = runs[(f"pool-{n}", "fedbip")]
        assert pool["error"] is None and len(pool["rounds"]) == 3
        rows = pool["extra"]["metrics"]
        assert [len(r["participants"]) for r in rows] == [8, 8, 8]
        dim = pool["extra"]["dim"]
        assert 0 < dim < 5000  # LoRA + classifier only
        assert all(r["bytes_in"] == r["bytes_out"] == 8 * dim * 4 for r in rows)
        assert len(rows[-1]["per_client_accuracy"]) == n  # the last round evaluates everyone
    # pool mode: 4x the clients on the same 2 actors costs little memory (measured in this run)
    small, large = runs[("pool-8", "fedbip")]["peak_pss"], runs[("pool-32", "fedbip")]["peak_pss"]
    assert 0 < large <= 1.5 * small, (small, large)

    aggs = data["aggregation"]
    assert sorted(a["strategy"] for a in aggs) == ["fedavg", "fedbip"]
    for agg in aggs:
        assert agg["skipped"] is None and agg["accepted"] == 16
        assert agg["seconds"] > 0 and agg["traced_peak"] > 0
        # between rounds the server keeps its states only (no task vectors unless recording)
        assert 16 * 20_000 * 4 <= agg["held_before"] < 1.5 * 16 * 20_000 * 4
        # allocations stay a small multiple of one N x D matrix (no per-pair copies)
        assert agg["traced_peak"] < 8 * 16 * 20_000 * 4

    assert "## Goals" in text
    assert "| steady rounds at most 1.05x the compute floor | tiny-bert " in text
    assert "| bytes per round close to 2 x k x D x 4 (at most 1.05x) | 1.00x (met)" in text
    # the report rebuilt from the JSON alone (nothing run again) names where each section came from
    again = tmp_path / "again.md"
    assert perf.main(["--sections", "bytes", "--reuse", str(raw), "--out", str(again)]) == 0
    rebuilt = again.read_text()
    for name in ("overhead", "pool", "aggregation"):
        assert f"- {name}: `python benchmarks/performance.py --quick --inprocess" in rebuilt
    assert "## 4. Server-side aggregation" in rebuilt and "## Goals" in rebuilt
    sources = json.loads(raw.read_text())["sources"]
    assert sources["overhead"].startswith("python benchmarks/performance.py --quick")
