"""A federation tracked by a real ``mlflow server``: metric history, heatmaps, bytes, git and
source tags, description, per-client dataset inputs, the experiment's kind, adapters that
reproduce each client's logged accuracy, and FAILED status on errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.data.shards import read_shard
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.tracking.adapters import evaluate_classifier, load_client_adapter
from fedbip_ray.tracking.mlflow_logger import MlflowCallback, git_commit

from ..conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

ROUNDS = 2




@pytest.fixture(scope="module")
def tracked(ray_local, mlflow_server, tmp_path_factory):
    """One tiny federation tracked on the server: (config, output dir, run id, summary)."""
    cfg = config_from_dict(tiny_config(
        name="tracked", federation={"rounds": ROUNDS},
        tracking={"mlflow": True, "tracking_uri": mlflow_server.uri, "experiment": "e2e-mlflow"}))
    out = tmp_path_factory.mktemp("tracked")
    cb = MlflowCallback(cfg)
    summary = run_federation(cfg, out, callbacks=[cb], echo=lambda s: None)
    return cfg, out, cb.run_id, summary


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_run_has_history_heatmaps_bytes_and_git_commit(tracked, mlflow_server):
    cfg, out, run_id, summary = tracked
    client = _client(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(run_id, "mean_accuracy")
    assert [m.step for m in hist] == list(range(1, ROUNDS + 1))
    assert hist[-1].value == pytest.approx(summary["mean_accuracy"])
    val = client.get_metric_history(run_id, "mean_val_accuracy")
    assert len(val) == ROUNDS
    # bytes moved: per round and cumulative, consistent with metrics.jsonl
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    total_in = sum(r["bytes_in"] for r in rows)
    assert total_in > 0
    per_round = client.get_metric_history(run_id, "bytes_in")
    assert [m.value for m in per_round] == [float(r["bytes_in"]) for r in rows]
    cumulative = client.get_metric_history(run_id, "bytes_in_total")
    assert cumulative[-1].value == pytest.approx(total_in)
    assert run.data.metrics["final_bytes_total"] == pytest.approx(
        total_in + sum(r["bytes_out"] for r in rows))
    # provenance
    commit = git_commit()
    assert commit and run.data.tags["git_commit"] == commit
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["git_dirty"] in ("true", "false")
    # matrices: JSON every round, heatmaps at round 1 and the last
    mats = {a.path for a in client.list_artifacts(run_id, "matrices")}
    for step in range(1, ROUNDS + 1):
        assert f"matrices/round_{step:05d}.json" in mats
        assert f"matrices/similarity_round_{step:05d}.png" in mats
        assert f"matrices/weights_round_{step:05d}.png" in mats
    with tempfile.TemporaryDirectory() as tmp:
        png = client.download_artifacts(run_id, f"matrices/similarity_round_{ROUNDS:05d}.png", tmp)
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapters = {a.path for a in client.list_artifacts(run_id, "adapters")}
    assert adapters == {f"adapters/client_{c:04d}" for c in range(cfg.data.num_clients)}


def test_run_page_fields_datasets_and_experiment_kind(tracked, mlflow_server):
    cfg, out, run_id, summary = tracked
    from fedbip_ray.tracking.datasets import file_digest

    client = _client(mlflow_server.uri)
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == tags["command"]
    note = tags["mlflow.note.content"]
    parts = (cfg.strategy.name, cfg.model.name, cfg.data.dataset, str(out), f"rounds: {ROUNDS}")
    for part in parts:
        assert part in note, part
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f"client_{c:04d}" for c in range(cfg.data.num_clients)}
    for c in range(cfg.data.num_clients):
        item = inputs[f"client_{c:04d}"]
        assert item.dataset.digest == file_digest(out / "shards" / f"client_{c:05d}.parquet")
        assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == f"client_{c:04d}"
        assert json.loads(item.dataset.profile)["num_rows"] == cfg.data.examples_per_client
    final = client.get_metric_history(run_id, "final_mean_accuracy")
    assert [m.step for m in final] == [ROUNDS]


def test_adapter_from_mlflow_reproduces_each_clients_accuracy(tracked, mlflow_server):
    cfg, out, run_id, summary = tracked
    from fedbip_ray.models.factory import load_tokenizer

    client = _client(mlflow_server.uri)
    tok = load_tokenizer(cfg.model)
    tests = {c: read_shard(out / "shards" / f"client_{c:05d}.parquet")["test"]
             for c in range(cfg.data.num_clients)}
    models = {}
    for c in range(cfg.data.num_clients):
        logged = client.get_metric_history(run_id, f"client_{c:04d}_accuracy")[-1]
        assert logged.step == ROUNDS
        models[c] = load_client_adapter(run_id, c, cfg, tracking_uri=mlflow_server.uri)
        got = evaluate_classifier(models[c], tok, tests[c], cfg.model.max_length,
                                  cfg.train.eval_batch_size)
        assert got["n"] == len(tests[c]) > 0
        assert got["accuracy"] == pytest.approx(logged.value, abs=1e-12), c
        assert got["accuracy"] == pytest.approx(summary["per_client_accuracy"][str(c)], abs=1e-12)
    # the adapters are personalized: client 0's adapter on client 1's (label-flipped) test set
    cross = evaluate_classifier(models[0], tok, tests[1], cfg.model.max_length)
    assert cross["accuracy"] < summary["per_client_accuracy"]["1"] - 0.3


def test_failed_federation_ends_failed_not_running(ray_local, mlflow_server, tmp_path):
    cfg = config_from_dict(tiny_config(
        name="boom", federation={"rounds": 2},
        tracking={"mlflow": True, "tracking_uri": mlflow_server.uri, "experiment": "e2e-mlflow"}))

    class Boom:
        def on_start(self, run):
            pass

        def on_round(self, run, row, report):
            raise RuntimeError(f"boom in round {row['round']}")

        def on_end(self, run, summary):
            pass

    cb = MlflowCallback(cfg, log_adapters=False)
    with pytest.raises(RuntimeError, match="boom in round 1"):
        run_federation(cfg, tmp_path / "boom", callbacks=[cb, Boom()], echo=lambda s: None)
    run = _client(mlflow_server.uri).get_run(cb.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom in round 1"
    paths = {a.path for a in _client(mlflow_server.uri).list_artifacts(cb.run_id)}
    assert {"error.txt", "metrics.jsonl"} <= paths
    cb.on_error(None, RuntimeError("again"))  # idempotent: the status stays
    assert _client(mlflow_server.uri).get_run(cb.run_id).info.status == "FAILED"
