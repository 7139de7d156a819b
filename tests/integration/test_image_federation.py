"""An image federation on a real local Ray: tiny CNN + LoRA on sklearn digits, rotation groups."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


def test_two_round_rotation_federation_on_digits(ray_local, tmp_path):
    cfg = config_from_dict(tiny_config(
        name="tiny-image",
        model={"name": "tiny-cnn", "task": "image-classification",
               "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
        data={"dataset": "digits", "num_clients": 4, "examples_per_client": 120,
              "partition": {"kind": "groups", "num_groups": 2, "shift": "rotation"}},
        train={"local_epochs": 3, "batch_size": 16, "lr": 0.01},
        federation={"rounds": 2},
    ))
    out = tmp_path / "img"
    summary = run_federation(cfg, out, echo=lambda s: None)

    # contract files
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in ("strategy", "rounds_completed", "mean_accuracy", "worst10_accuracy",
                "per_client_accuracy", "wall_seconds"):
        assert key in summary
    assert summary["rounds_completed"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert set(rows[-1]["per_client_accuracy"]) == {"0", "1", "2", "3"}
    assert (out / "config.yaml").is_file()

    # shards carry the images; rotation shifts covariates, never labels
    shard = pd.read_parquet(out / "shards" / "client_00001.parquet")
    assert {"image", "height", "width", "group", "label"} <= set(shard.columns)
    assert set(shard["group"]) == {1} and set(shard["text"]) == {""}

    # ten classes: chance is 0.1
    assert summary["mean_accuracy"] > 0.3, summary
