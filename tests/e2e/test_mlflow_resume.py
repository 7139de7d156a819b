"""End to end: `fedbip run` tracked by a real `mlflow server`, SIGKILLed after MLflow holds rounds
past its last checkpoint, then resumed with `--resume`: one MLflow run, RUNNING while killed,
FINISHED after, with exactly one value per round for every metric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO, tiny_config
from .servers import env

pytestmark = pytest.mark.e2e
FEDBIP = str(REPO / ".venv" / "bin" / "fedbip")
ROUNDS, EVERY = 8, 4  # checkpoints after rounds 4 and 8: the kill lands in rounds 5-8




def fedbip(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([FEDBIP, "run", *args], cwd=REPO, env=env(), stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def kill_after_mlflow_passes_the_checkpoint(proc: subprocess.Popen, client, exp_name: str,
                                            timeout: float = 400) -> str:
    """SIGKILL the run's process group once MLflow holds round EVERY + 1; its run id."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name(exp_name)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and EVERY + 1 in steps(client, runs[0].info.run_id, "round_seconds"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError(f"run ended ({proc.poll()}) or timed out before round {EVERY + 1}")


def test_killed_and_resumed_run_continues_one_mlflow_run(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(
        name="resumed", federation={"rounds": ROUNDS, "checkpoint_every": EVERY},
        tracking={"mlflow": True, "tracking_uri": mlflow_server.uri, "experiment": "resume"})))
    out, log = tmp_path / "out", tmp_path / "log.txt"
    run_id = kill_after_mlflow_passes_the_checkpoint(
        fedbip([str(config), "--output", str(out)], log), client, "resume")

    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert latest["round"] == EVERY, "the kill came after the next checkpoint"
    meta = json.loads((out / "checkpoints" / latest["path"] / "meta.json").read_text())
    assert meta["extra"]["mlflow_run_id"] == run_id
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING"
    logged_before = steps(client, run_id, "round_seconds")
    assert logged_before[-1] > EVERY  # rounds the resumed run will train again

    proc = fedbip([str(config), "--resume", str(out)], log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"resumed from round_{EVERY:05d}" in text
    assert f"MLflow run {run_id}: {mlflow_server.uri}/#/experiments/" in text

    exp = client.get_experiment_by_name("resume")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_round"] == str(EVERY)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    round_keys = [k for k in run.data.metrics if not k.startswith("final_")]
    assert {"mean_accuracy", "round_seconds", "client_0003_accuracy"} <= set(round_keys)
    for key in round_keys:
        assert steps(client, run_id, key) == list(range(1, ROUNDS + 1)), key
    for key in (k for k in run.data.metrics if k.startswith("final_")):
        assert steps(client, run_id, key) == [ROUNDS], key
    # accuracy is deterministic: MLflow's history equals the resumed run's metrics.jsonl
    acc = {m.step: m.value for m in client.get_metric_history(run_id, "mean_accuracy")}
    assert acc == {r["round"]: pytest.approx(r["mean_accuracy"]) for r in rows}
    assert len(run.inputs.dataset_inputs) == 4
