"""Tracking without a server or Ray: URIs, byte totals, run status, git and source tags, the
printed address, dataset inputs and a resumed run's metric history on a real sqlite MLflow store,
local adapters."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.tracking import mlflow_logger as ml
from fedbip_ray.tracking import run_info
from fedbip_ray.tracking.adapters import (
    evaluate_classifier,
    find_adapter_dir,
    load_client_adapter,
    num_labels_from_adapter,
)

from ..conftest import tiny_config


def test_relative_stores_become_absolute(tmp_path):
    assert ml.absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert ml.absolute_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert ml.absolute_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert ml.absolute_tracking_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")


def test_byte_totals_and_statuses():
    rows = [{"bytes_in": 10, "bytes_out": 3}, {"bytes_in": 5, "bytes_out": None}]
    assert ml.byte_totals(rows) == {"bytes_in_total": 15.0, "bytes_out_total": 3.0,
                                    "bytes_total": 18.0}
    assert ml.run_status_for(RuntimeError()) == "FAILED"
    assert ml.run_status_for(KeyboardInterrupt()) == "KILLED"
    assert ml.run_status_for(SystemExit(0)) == "KILLED"


def test_git_tags_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setattr(run_info, "_git", lambda *a: None)  # e.g. a `ray job submit` working dir
    monkeypatch.setenv("FEDBIP_GIT_COMMIT", "abc123")
    assert ml.git_tags() == {"mlflow.source.git.commit": "abc123", "git_commit": "abc123"}
    monkeypatch.delenv("FEDBIP_GIT_COMMIT")
    assert ml.git_tags() == {}


def test_a_saved_adapter_loads_back_with_peft(tmp_path):
    """Save a trained-looking adapter from the trainer, load it with load_client_adapter."""
    from fedbip_ray.training.sequence import SequenceTrainer

    cfg = config_from_dict(tiny_config())
    trainer = SequenceTrainer(cfg, 2)
    state = trainer.initial_state() + np.random.default_rng(0).normal(
        0, 0.05, trainer.layout.size).astype(np.float32)
    trainer.load_state(state)
    target = tmp_path / "adapters" / "client_0003"
    trainer.model.save_pretrained(str(target))
    assert find_adapter_dir(tmp_path, 3) == target
    assert find_adapter_dir(tmp_path / "adapters", 3) == target
    assert find_adapter_dir(tmp_path, 2) is None
    assert num_labels_from_adapter(target) == 2
    model = load_client_adapter(tmp_path, 3, cfg)
    import pandas as pd

    frame = pd.DataFrame({"text": ["good movie", "bad film", "great fun"], "label": [1, 0, 1]})
    got = evaluate_classifier(model, trainer.tokenizer, frame, cfg.model.max_length)
    want = trainer.evaluate(trainer.encode(frame))
    assert (got["accuracy"] == want["accuracy"]
            and got["loss"] == pytest.approx(want["loss"], rel=1e-5))
    with pytest.raises(ConfigError, match="no adapter for client 2"):
        load_client_adapter(tmp_path, 2, cfg)


# ------------------------------------------------------------------ what a run page shows
def test_where_to_look_names_the_run_url_or_the_local_store():
    url = run_info.where_to_look("http://127.0.0.1:5005/", "7", "abc")
    assert url == ("MLflow run abc: http://127.0.0.1:5005/#/experiments/7/runs/abc"
                   "?workflowType=machine_learning")
    local = run_info.where_to_look("sqlite:///mlflow.db", "1", "abc")
    assert "bash scripts/mlflow_ui.sh" in local and "MLFLOW_BACKEND" not in local
    assert "http://127.0.0.1:5000/#/experiments/1/runs/abc" in local
    other = run_info.where_to_look("sqlite:////data/x y.db", "1", "abc")
    assert "MLFLOW_BACKEND='sqlite:////data/x y.db' bash scripts/mlflow_ui.sh" in other


def test_source_tags_and_description():
    tags = run_info.source_tags(["/venv/bin/fedbip", "run", "a b.yaml"], {})
    assert tags == {"mlflow.source.name": "fedbip run 'a b.yaml'", "mlflow.source.type": "LOCAL",
                    "command": "fedbip run 'a b.yaml'"}
    job = run_info.source_tags(["jobs/train.py"], {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"})
    assert job["mlflow.source.type"] == "JOB"
    cfg = config_from_dict(tiny_config(federation={"rounds": 3}))
    text = run_info.run_description(cfg, "/runs/x")
    for part in ("fedbip", "tiny-bert", "synthetic-text", "4 clients", "rounds: 3", "/runs/x"):
        assert part in text, part


def test_ledger_keeps_the_first_value_per_step():
    ledger = run_info.MetricLedger.from_history({"a": [1, 2], "b": [1]})
    assert ledger.fresh({"a": 5.0, "b": 6.0, "c": 7.0}, 2) == {"b": 6.0, "c": 7.0}
    assert ledger.fresh({"a": 5.0, "b": 6.0}, 2) == {}
    assert ledger.steps("a") == [1, 2] and ledger.steps("b") == [1, 2]


def _row(rnd: int, seconds: float) -> dict:
    acc = 0.5 + 0.1 * rnd
    return {"round": rnd, "seconds": seconds, "bytes_in": 100, "bytes_out": 200,
            "accepted": [0, 1], "failed": {}, "rejected": {}, "stragglers": [],
            "mean_accuracy": acc, "worst10_accuracy": acc, "std_accuracy": float("nan"),
            "per_client_accuracy": {"0": acc, "1": acc}, "extra": {"fit_seconds": seconds}}


def test_row_metrics_drop_nan_and_count_clients():
    rows = [_row(1, 1.0), _row(2, 2.0)]
    got = run_info.row_metrics(rows[1], rows)
    assert "std_accuracy" not in got
    assert got["clients_accepted"] == 2.0 and got["client_0001_accuracy"] == pytest.approx(0.7)
    assert got["bytes_in_total"] == 200.0 and got["fit_seconds"] == 2.0


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A real MLflow sqlite store; the working dir (default artifact root ./mlruns) in tmp."""
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_experiment_kind_is_set_on_new_and_old_experiments(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp_id = ml.ensure_experiment(client, "new")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("old")
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert ml.ensure_experiment(client, "old") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def _context(tmp_path, store, rounds=4, **kw):
    """A RunContext over real shards (no Ray): what MlflowCallback reads."""
    from fedbip_ray.data.shards import build_shards
    from fedbip_ray.runtime.context import RunContext

    cfg = config_from_dict(tiny_config(
        federation={"rounds": rounds}, tracking={"mlflow": True, "tracking_uri": store,
                                                 "experiment": "resume"}))
    out = tmp_path / "out"
    shards = build_shards(cfg.data, cfg.seed, out / "shards")
    (out / "config.yaml").write_text("name: tiny\n")
    return RunContext(cfg, out, shards, **kw)


def _finish(cb, ctx, rows):
    import json

    from fedbip_ray.runtime.messages import AggregationReport

    for row in rows:
        ctx.history.append(row)
        cb.on_round(ctx, row, AggregationReport(round=row["round"]))
    (ctx.output / "summary.json").write_text(json.dumps({"mean_accuracy": 0.9}))
    (ctx.output / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in ctx.history))
    cb.on_end(ctx, {"mean_accuracy": 0.9, "wall_seconds": 3.0})


def test_a_resumed_run_continues_its_mlflow_run_with_one_value_per_step(tmp_path, store):
    """Killed after logging rounds 1-3 with a checkpoint at round 2, resumed from it: the same
    run ends FINISHED with exactly one value per (metric, round), inputs logged once."""
    from mlflow.tracking import MlflowClient

    from fedbip_ray.runtime.messages import AggregationReport

    client = MlflowClient(tracking_uri=store)
    ctx = _context(tmp_path, store)
    ctx_cfg = ctx.cfg
    first = ml.MlflowCallback(ctx_cfg, log_adapters=False)
    first.on_start(ctx)
    assert ctx.meta == {"mlflow_run_id": first.run_id, "mlflow_experiment_id": first.experiment_id}
    killed = [_row(1, 1.0), _row(2, 1.0), _row(3, 1.0)]
    for row in killed:
        ctx.history.append(row)
        first.on_round(ctx, row, AggregationReport(round=row["round"]))
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        f"client_{c:04d}" for c in range(ctx_cfg.data.num_clients)}

    second = ml.MlflowCallback(ctx_cfg, log_adapters=False)
    resumed = _context(tmp_path, store, first_round=3, history=killed[:2], meta=dict(ctx.meta))
    second.on_start(resumed)
    assert second.run_id == first.run_id and second.resumed
    assert client.get_run(first.run_id).info.status == "RUNNING"
    _finish(second, resumed, [_row(3, 9.0), _row(4, 9.0)])

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_round"] == "2"
    for key in ("round_seconds", "mean_accuracy", "client_0000_accuracy", "bytes_in_total"):
        hist = client.get_metric_history(first.run_id, key)
        assert sorted(m.step for m in hist) == [1, 2, 3, 4], key
    secs = {m.step: m.value for m in client.get_metric_history(first.run_id, "round_seconds")}
    assert secs == {1: 1.0, 2: 1.0, 3: 1.0, 4: 9.0}  # round 3: the value logged first stays
    final = client.get_metric_history(first.run_id, "final_mean_accuracy")
    assert [(m.step, m.value) for m in final] == [(4, 0.9)]
    assert len(run.inputs.dataset_inputs) == ctx_cfg.data.num_clients
    assert len(client.search_runs([first.experiment_id])) == 1
    assert "mlflow.note.content" in run.data.tags and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert second.where_to_look().startswith(f"MLflow run {first.run_id} in sqlite:///")


def test_shard_inputs_carry_digest_profile_and_context(tmp_path, store):
    import json

    from fedbip_ray.tracking.datasets import file_digest, shard_inputs

    ctx = _context(tmp_path, store)
    inputs = shard_inputs(ctx.shards)
    assert len(inputs) == ctx.shards.num_clients
    for cid, item in enumerate(inputs):
        ds = item.dataset
        assert ds.name == f"client_{cid:04d}" and ds.digest == file_digest(ctx.shards.paths[cid])
        profile = json.loads(ds.profile)
        s = ctx.shards.summary[cid]
        assert profile["num_rows"] == s["train"] + s["val"] + s["test"]
        assert profile["bytes"] == ctx.shards.paths[cid].stat().st_size
        assert {t.key: t.value for t in item.tags} == {"mlflow.data.context": f"client_{cid:04d}"}
        assert "text" in ds.schema and str(ctx.shards.paths[cid]) in ds.source
    assert len({i.dataset.digest for i in inputs}) == len(inputs)


def test_where_each_client_trained_is_a_run_tag_updated_when_it_moves(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from fedbip_ray.runtime.messages import AggregationReport

    ctx = _context(tmp_path, store, rounds=2)
    cb = ml.MlflowCallback(ctx.cfg, log_adapters=False)
    cb.on_start(ctx)
    for rnd, where in ((1, "nodeA/cpu"), (2, "nodeB/cuda:0 (GPU 0)")):
        row = {**_row(rnd, 1.0), "placement": {"0": where, "1": "nodeA/cpu"}}
        ctx.history.append(row)
        cb.on_round(ctx, row, AggregationReport(round=rnd))
    tags = MlflowClient(tracking_uri=store).get_run(cb.run_id).data.tags
    assert tags["placement.client_0000"] == "nodeB/cuda:0 (GPU 0)"
    assert tags["placement.client_0001"] == "nodeA/cpu"


def test_per_task_and_per_client_validation_scores_are_metrics():
    row = {**_row(1, 1.0), "per_client_val_accuracy": {"0": 0.4, "1": 0.6},
           "per_task_score": {"sentiment": 0.8, "word reversal?": 0.3},
           "per_task_val_score": {"sentiment": 0.7}}
    got = run_info.row_metrics(row, [row])
    assert got["client_0001_val_accuracy"] == pytest.approx(0.6)
    assert got["task_sentiment_score"] == pytest.approx(0.8)
    assert got["task_word reversal__score"] == pytest.approx(0.3)
    assert got["task_sentiment_val_score"] == pytest.approx(0.7)
