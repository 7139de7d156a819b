"""Client-level DP on task vectors: clip + Gaussian noise on the server, privacy spent
(epsilon at delta, dp-accounting) reported per round in metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import math

import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.privacy import dp_epsilon, privacy_report
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise():
    e1, e2 = dp_epsilon(1.0, 0.5, 1, 1e-5), dp_epsilon(1.0, 0.5, 2, 1e-5)
    assert 0 < e1 < e2
    assert dp_epsilon(2.0, 0.5, 2, 1e-5) < e2 < dp_epsilon(1.0, 1.0, 2, 1e-5)
    assert dp_epsilon(1.0, 0.5, 2, 1e-3) < e2  # a looser delta costs less epsilon
    assert dp_epsilon(1.0, 0.5, 0, 1e-5) == 0.0 and math.isinf(dp_epsilon(0.0, 0.5, 3, 1e-5))
    # a known point: DP-SGD-like q=0.01, z=1.1, 1000 steps is a few epsilon at 1e-5
    assert 1.0 < dp_epsilon(1.1, 0.01, 1000, 1e-5) < 3.0
    assert privacy_report(1.0, 0.0, 1e-5, 1.0, 3)["epsilon"] is None  # JSON-safe infinity


@pytest.mark.ray
def test_dp_run_reports_privacy_spent_every_round(ray_local, tmp_path):
    cfg = config_from_dict(tiny_config(
        federation={"rounds": 2, "clients_per_round": 2},
        privacy={"clip_norm": 2.0, "noise_multiplier": 0.8, "delta": 1e-4}))
    summary = run_federation(cfg, tmp_path / "dp", echo=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert eps == [pytest.approx(dp_epsilon(0.8, 0.5, r, 1e-4)) for r in (1, 2)]
    assert 0 < eps[0] < eps[1]
    assert [r["extra"]["dp_epsilon"] for r in rows] == eps  # what MLflow logs
    assert rows[0]["privacy"]["clip_norm"] == 2.0 and rows[0]["privacy"]["sample_rate"] == 0.5
    assert summary["privacy"]["epsilon"] == eps[-1]
