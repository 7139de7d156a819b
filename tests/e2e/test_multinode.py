"""End to end on a fake multi-node cluster (one per session, started with no workers): the
client actors' resources come from the autoscaler, the run records where each client trained,
and a run survives the loss of a node. The tests run in file order on the same cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedbip_ray.config import load_config
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime import local_cluster
from fedbip_ray.runtime.federation import run_federation

from ..conftest import REPO
from .multinode import alive_nodes, cluster_env, multinode_cluster, submit  # noqa: F401

pytestmark = pytest.mark.e2e

CONFIG = "jobs/configs/tiny.yaml"
SMALL = ("data.num_clients=4", "federation.rounds=2", "tracking.mlflow=false",
         "resources.num_actors=2")
ON_GPU_NODES = ("resources.num_gpus_per_client=1",)
SHARDED = ("federation.server_shards=2",)  # the job's server: 2 block actors + a coordinator
WHERE = re.compile(r"^(?P<node>[0-9a-f]+)/cpu \(GPU (?P<gpu>\d+)\)$")


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def nodes_of(row: dict[str, Any]) -> dict[str, str]:
    """{client: node id} of a row's placement (every entry must name a GPU it was given)."""
    found = {c: WHERE.match(v) for c, v in row["placement"].items()}
    assert all(found.values()), row["placement"]
    return {c: m["node"] for c, m in found.items() if m}


# ------------------------------------------------------------------ (a) ray job submit, autoscaled
@pytest.fixture(scope="module")
def job(multinode_cluster, tmp_path_factory) -> dict[str, Any]:  # noqa: F811
    before = alive_nodes(multinode_cluster)
    out = tmp_path_factory.mktemp("job") / "run"
    t0 = time.monotonic()
    proc = submit(multinode_cluster, REPO, "python", str(REPO / "jobs" / "train.py"),
                  "--config", str(REPO / CONFIG),
                  *sets(*SMALL, *ON_GPU_NODES, *SHARDED), "--output", str(out))
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    after = alive_nodes(multinode_cluster)
    lines = [ln for ln in proc.stdout.splitlines() if "client resources" in ln]
    print({"nodes_before": len(before), "nodes_after": len(after), "seconds": round(seconds),
           "lines": lines, "placement": rows(out)[-1]["placement"]})
    return {"proc": proc, "out": out, "before": before, "after": after, "lines": lines}


def test_a_job_on_a_fresh_cluster_gets_gpu_nodes_from_the_autoscaler(job):
    assert "succeeded" in job["proc"].stdout
    assert len(job["before"]) == 1  # the CPU head only
    added = {n: v for n, v in job["after"].items() if n not in job["before"]}
    assert len(added) >= 2 and all(v["resources_total"].get("GPU") == 1.0 for v in added.values())
    assert job["lines"][-1].startswith("client resources ready: 2 bundles {CPU: 1, GPU: 1} on 2")
    summary = json.loads((job["out"] / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    shards = {p.name for p in (job["out"] / "checkpoints").glob("round_00002/server_shard_*")}
    assert shards == {"server_shard_000.safetensors", "server_shard_001.safetensors"}


def test_the_rows_say_which_gpu_node_trained_each_client(job):
    for row in rows(job["out"]):
        where = nodes_of(row)
        assert sorted(where) == ["0", "1", "2", "3"]
        assert len(set(where.values())) >= 2
        assert set(where.values()) <= set(job["after"]) - set(job["before"])


def test_the_cluster_run_gives_the_results_of_a_one_node_run(job, ray_local, tmp_path):
    # same seed; CPU bundles on the embedded Ray, one server actor (the job's is sharded)
    cfg = load_config(REPO / CONFIG, SMALL)
    run_federation(cfg, tmp_path / "ref", echo=lambda _: None)
    ref, got = rows(tmp_path / "ref"), rows(job["out"])
    assert len(ref) == len(got) == 2
    for r, g in zip(ref, got, strict=True):
        assert g["per_client_accuracy"] == r["per_client_accuracy"]
        assert g["per_client_val_accuracy"] == r["per_client_val_accuracy"]
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
    assert "placement" in ref[0] and not any(WHERE.match(v) for v in ref[0]["placement"].values())


# ------------------------------------------------------------------ (b) a node lost mid-round
ROUNDS = 3


def _watch_until_round(proc: subprocess.Popen, out: Path, seen: set[str], rnd: int,
                       timeout_s: float) -> list[dict[str, Any]]:
    """Poll the run's files until ``rnd`` rows exist, noting every checkpoint directory seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ck = out / "checkpoints"
        if ck.is_dir():
            seen |= {p.name for p in ck.iterdir() if p.name.startswith("round_")}
        done = rows(out) if (out / "metrics.jsonl").is_file() else []
        if len(done) >= rnd or proc.poll() is not None:
            return done
        time.sleep(0.2)
    raise AssertionError(f"round {rnd} not done in {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def node_loss(multinode_cluster, job, tmp_path_factory) -> dict[str, Any]:  # noqa: F811
    out = tmp_path_factory.mktemp("loss") / "run"
    log = out.parent / "driver.log"
    overrides = (*SMALL, *ON_GPU_NODES, f"federation.rounds={ROUNDS}",
                 "federation.checkpoint_every=1", "data.examples_per_client=120")
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "jobs/train.py", "--config", CONFIG,
                                 *sets(*overrides), "--output", str(out)], cwd=REPO,
                                env=cluster_env(multinode_cluster), stdout=fh,
                                stderr=subprocess.STDOUT)
    seen: set[str] = set()
    try:
        first = _watch_until_round(proc, out, seen, 1, 240)
        assert first, log.read_text()[-4000:]
        victim = nodes_of(first[0])["0"]  # the node of client 0's actor: lost in round 2
        killed = local_cluster.kill_node(multinode_cluster.temp_dir, victim)
        kill_s = time.monotonic() - t0
        _watch_until_round(proc, out, seen, ROUNDS, 300)
        rc = proc.wait(timeout=60)
        _watch_until_round(proc, out, seen, ROUNDS, 1)  # the last checkpoint, written by now
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    info = {"rc": rc, "victim": victim, "killed": killed, "kill_s": round(kill_s),
            "seconds": round(time.monotonic() - t0), "checkpoints_seen": sorted(seen),
            "rows": [{k: r[k] for k in ("round", "failed", "eval_failed", "seconds")}
                     for r in rows(out)]}
    print(info)
    assert rc == 0, log.read_text()[-4000:]
    return {**info, "out": out, "first": first[0]}


def test_a_lost_node_fails_its_clients_and_the_run_finishes(node_loss):
    got = rows(node_loss["out"])
    assert [r["round"] for r in got] == list(range(1, ROUNDS + 1))
    lost = {c for c, n in nodes_of(node_loss["first"]).items() if n == node_loss["victim"]}
    hit = {c for r in got[1:] for c in (*r["failed"], *r["eval_failed"])}
    assert hit and hit <= lost, (hit, lost)
    assert not got[-1]["failed"] and not got[-1]["eval_failed"]
    summary = json.loads((node_loss["out"] / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS


def test_the_lost_clients_actors_come_back_on_a_live_node(
        node_loss, multinode_cluster):  # noqa: F811
    alive = alive_nodes(multinode_cluster)
    assert node_loss["victim"] not in alive
    last = nodes_of(rows(node_loss["out"])[-1])
    assert sorted(last) == ["0", "1", "2", "3"]
    assert node_loss["victim"] not in last.values() and set(last.values()) <= set(alive)
    assert local_cluster.node_pids(multinode_cluster.temp_dir, node_loss["victim"]) == []


def test_every_round_has_its_checkpoint(node_loss):
    assert node_loss["checkpoints_seen"] == [f"round_{r:05d}" for r in range(1, ROUNDS + 1)]
    latest = ckpt_io.read_latest(node_loss["out"] / "checkpoints")
    assert latest is not None and latest.round == ROUNDS and len(latest.history) == ROUNDS


# ------------------------------------------------------------------ what can never come fails fast
def probe() -> None:
    """Runs in a subprocess joined to the cluster; prints one JSON object of what it saw."""
    import ray

    from fedbip_ray.config import ConfigError
    from fedbip_ray.runtime import acquire

    ray.init(logging_level="ERROR", log_to_driver=False)
    out: dict[str, Any] = {}
    start = time.monotonic()
    try:
        acquire.acquire_bundles(2, 1, 5, timeout_s=60, echo=lambda _: None)
        out["never"] = None
    except ConfigError as exc:
        out["never"] = str(exc)
    out["never_s"] = time.monotonic() - start
    print("PROBE " + json.dumps(out))


def test_a_request_no_node_can_hold_fails_at_once_in_one_line(multinode_cluster):  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.e2e.test_multinode import probe; probe()"],
        cwd=REPO, env=cluster_env(multinode_cluster), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(lines[-1][len("PROBE "):])
    msg = seen["never"]
    assert msg is not None and "\n" not in msg
    assert msg.startswith("resources.num_gpus_per_client=5: no node can ever hold")
    assert "gpu_worker {CPU: 1, GPU: 1} x3" in msg
    assert seen["never_s"] < 10
