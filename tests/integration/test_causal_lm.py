"""Federated instruction tuning of a causal LM (tiny random-init Llama) on a real local Ray."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.data.instruct import TASKS
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


def lm_config(**sections) -> dict:
    """6 clients, one instruction task each (column partition), tiny Llama with LoRA q/v."""
    base = tiny_config(
        name="tiny-lm",
        model={"name": "tiny-llama", "task": "causal-lm", "max_length": 80,
               "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "intermediate_size": 32},
               "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
        data={"dataset": "instruct-tasks", "num_clients": 6, "examples_per_client": 12,
              "val_fraction": 0.15, "test_fraction": 0.25, "partition": {"kind": "column"}},
        train={"local_epochs": 1, "batch_size": 8, "lr": 0.01, "eval_batch_size": 8},
        federation={"rounds": 2},
    )
    return {**base, **sections}


def test_causal_lm_federation_writes_scores_and_contract_files(ray_local, tmp_path):
    cfg = config_from_dict(lm_config())
    out = tmp_path / "lm"
    summary = run_federation(cfg, out, echo=lambda s: None)

    assert (out / "config.yaml").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["rounds_completed"] == 2 and summary["strategy"] == "fedbip"
    scores = summary["per_client_accuracy"]
    assert set(scores) == {str(c) for c in range(6)}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(set(r["per_client_accuracy"]) == set(scores) for r in rows)
    assert all(r["train_loss"] is not None and r["train_loss"] > 0 for r in rows)
    assert (out / "checkpoints" / "latest.json").is_file()
    # one task per client: each client's shard holds exactly one of the six tasks
    meta = json.loads((out / "shards" / "clients.json").read_text())
    assert tuple(meta["label_names"]) == TASKS
    tasks = [pd.read_parquet(out / "shards" / f"client_{c:05d}.parquet")["task"].unique().tolist()
             for c in range(6)]
    assert sorted(t for [t] in tasks) == sorted(TASKS)


def test_instruct_benchmark_quick_miniature(ray_local, tmp_path):
    """CI miniature of ``benchmarks/instruct.py --quick`` (tiny random-init Llama)."""
    import importlib.util

    from ..conftest import REPO

    spec = importlib.util.spec_from_file_location("fedbip_bench_instruct",
                                                  REPO / "benchmarks" / "instruct.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "instruct.md"
    assert mod.main(["--quick", "--strategies", "local,fedbip", "--set", "federation.rounds=1",
                     "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    text = out.read_text()
    raw = json.loads((tmp_path / "w" / "instruct.json").read_text())
    assert sorted(r["strategy"] for r in raw) == ["fedbip", "local"]
    for r in raw:
        assert set(r["scores"]) >= {"sentiment", "sentiment-flipped", "average"}
        assert all(0 <= v <= 1 for v in r["scores"].values())
        assert r["step_seconds"] and all(s > 0 for s in r["step_seconds"])
        assert r["client_peak_rss_mib"] > 100
    assert "| s/train step | client peak RSS (MiB) |" in text and "| fedbip |" in text
    assert out.with_name("instruct.png").stat().st_size > 1000
    assert "| local | " in text.split("paired by seed")[1]  # fedbip minus local, paired by seed
    # the report can be rebuilt from the raw results, with a preamble
    (tmp_path / "pre.md").write_text("Notes on this run.")
    assert mod.main(["--quick", "--report-only", "--set", "federation.rounds=1",
                     "--preamble", str(tmp_path / "pre.md"),
                     "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    rebuilt = out.read_text()
    assert "Notes on this run." in rebuilt and rebuilt.replace("Notes on this run.\n\n", "").split(
        "Model ")[1] == text.split("Model ")[1]


def test_instruct_job_config_runs_through_the_cli_into_mlflow(ray_local, tmp_path):
    """`fedbip run jobs/configs/instruct.yaml` (shrunk to a tiny Llama and one round): the
    CLI path with MLflow on, into a local SQLite store."""
    import mlflow

    from fedbip_ray.cli import main

    from ..conftest import REPO

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "instruct"
    tiny = ["model.name=tiny-llama", "model.max_length=80", "model.peft.r=4",
            "model.tiny={hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}",
            "data.examples_per_client=12", "federation.rounds=1", f"tracking.tracking_uri={store}"]
    args = ["run", str(REPO / "jobs" / "configs" / "instruct.yaml"), "--output", str(out)]
    assert main(args + [x for s in tiny for x in ("--set", s)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and len(summary["per_client_accuracy"]) == 12
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["fedbip-instruct"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.task"] == "causal-lm"
    assert abs(runs[0].data.metrics["mean_accuracy"] - summary["mean_accuracy"]) < 1e-9
