"""A tiny Ray Tune search on a real local Ray: one MLflow parent run with a child run per
trial, ASHA on validation accuracy, best config written as a plain run config."""

from __future__ import annotations

import json

import pytest

from fedbip_ray.config import load_config
from fedbip_ray.tuning.search import run_tune

from ..conftest import REPO

pytestmark = pytest.mark.ray


def test_tiny_search_tracks_trials_as_children_and_writes_best_config(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "search"
    summary = run_tune(REPO / "jobs" / "configs" / "tune_tiny.yaml",
                       [f"tracking.tracking_uri={uri}", "tune.num_samples=2"], out)

    trials = summary["trials"]
    assert len(trials) == 2 and not [t for t in trials if t["status"] == "error"]
    assert any(t["status"] == "complete" for t in trials)
    best = summary["best"]
    complete = [t for t in trials if t["status"] == "complete"]
    assert best["metric_value"] == max(t["last"]["mean_val_accuracy"] for t in complete)
    assert best["round"] == 2
    # the best config is a plain run config with the best trial's parameters
    cfg = load_config(out / "best_config.yaml")
    assert cfg.name == "tune-tiny-best" and cfg.federation.rounds == 2
    for key, value in best["params"].items():
        assert cfg.strategy.params[key.split(".")[-1]] == value
    assert (json.loads((out / "tune_summary.json").read_text())["best"]["trial_id"]
            == best["trial_id"])
    best_dir = out / "trials" / best["trial_id"]
    assert json.loads((best_dir / "summary.json").read_text())["mean_accuracy"] == pytest.approx(
        best["test_mean_accuracy"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_id"] == best["trial_id"]
    assert parent.data.metrics["best_mean_val_accuracy"] == pytest.approx(best["metric_value"])
    assert parent.data.params["space.strategy.params.threshold"] == '{"uniform": [-0.2, 0.6]}'
    assert {"best_config.yaml", "tune_summary.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    by_id = {c.info.run_id: c for c in children}
    for t in trials:
        child = by_id[t["mlflow_run_id"]]
        assert child.data.tags["tune.trial_id"] == t["trial_id"]
        assert float(child.data.params["strategy.params.threshold"]) == pytest.approx(
            t["params"]["strategy.params.threshold"])
        hist = client.get_metric_history(child.info.run_id, "mean_val_accuracy")
        assert [m.step for m in hist] == list(range(1, t["last"]["round"] + 1))
        assert hist[-1].value == pytest.approx(t["last"]["mean_val_accuracy"])
        if t["status"] == "complete":
            assert child.info.status == "FINISHED"
            assert child.data.tags["tune.early_stopped"] == "false"
            assert (child.data.metrics["final_mean_accuracy"]
                    == pytest.approx(t["last"]["mean_accuracy"]))
        else:  # stopped by ASHA after round 1: never left RUNNING
            assert child.info.status == "KILLED"
            assert child.data.tags["tune.early_stopped"] == "true"
    assert best["mlflow_run_id"] == parent.data.tags["best_run_id"]
