"""End to end: `ray start --head` + `ray job submit jobs/train.py`, tracked by a real MLflow
server."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from ..conftest import REPO
from .servers import MlflowServer, RayHead

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def servers():
    tmp = Path(tempfile.mkdtemp(prefix="fbe2e", dir="/tmp"))
    head = RayHead(tmp / "ray")
    mlf = MlflowServer(tmp)
    try:
        head.start()
        mlf.start()
        yield head, mlf, tmp
    finally:
        mlf.stop()
        head.stop()


def submit_job(servers, script: str, config: str, name: str):
    """``ray job submit`` of ``jobs/SCRIPT --config CONFIG`` tracked in the test's MLflow server;
    asserts the job succeeded. Returns (completed process, output directory)."""
    head, mlf, tmp = servers
    out = tmp / name
    proc = head.submit(REPO, "python", f"jobs/{script}", "--config", config,
                       "--output", str(out), "--set", f"tracking.tracking_uri={mlf.uri}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_ray_job_submit_runs_a_federation_tracked_in_mlflow(servers):
    _, mlf, _ = servers
    proc, out = submit_job(servers, "train.py", "jobs/configs/tiny.yaml", "run")
    assert "succeeded" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["strategy"] == "fedbip"
    assert 0.0 <= summary["mean_accuracy"] <= 1.0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlf.uri)
    exp = client.get_experiment_by_name("fedbip-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["strategy"] == "fedbip"
    assert run.data.params["federation.rounds"] == "3"
    hist = client.get_metric_history(run.info.run_id, "mean_accuracy")
    assert [m.step for m in hist] == [1, 2, 3]
    assert hist[-1].value == pytest.approx(summary["mean_accuracy"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "matrices", "plots", "adapters"} <= top
    mats = {a.path for a in client.list_artifacts(run.info.run_id, "matrices")}
    assert "matrices/similarity_round_00003.png" in mats and "matrices/round_00002.json" in mats
    adapters = {a.path for a in client.list_artifacts(run.info.run_id, "adapters/client_0001")}
    assert "adapters/client_0001/adapter_config.json" in adapters


def test_ray_job_submit_runs_a_tune_search(servers):
    _, mlf, _ = servers
    _, out = submit_job(servers, "tune.py", "jobs/configs/tune_tiny.yaml", "tune")
    assert (out / "best_config.yaml").is_file()
    summary = json.loads((out / "tune_summary.json").read_text())
    assert summary

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlf.uri)
    exp = client.get_experiment_by_name("fedbip-tune-tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) >= 1 and len(children) >= 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} <= {p.info.run_id for p in parents}
