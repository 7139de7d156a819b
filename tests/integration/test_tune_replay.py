"""Replay tuning on a real local Ray: record a tiny run's task vectors, check that replaying
its own parameters reproduces its states, and search aggregation parameters without training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fedbip_ray.cli import main
from fedbip_ray.config import ConfigError, config_from_dict, load_config
from fedbip_ray.runtime.checkpoint import read_latest
from fedbip_ray.tuning import replay
from fedbip_ray.tuning.recording import load_recording, recover_deltas
from fedbip_ray.tuning.replay import record_run, replay_states, run_replay

from ..conftest import tiny_config

pytestmark = pytest.mark.ray

# cumulative vectors, negatives clipped, self weight 1 (W invertible: recoverable from states)
PARAMS = {"reference": "pretrained", "self_similarity": "one", "threshold": None, "gate": []}


@pytest.fixture(scope="module")
def recorded(ray_local, tmp_path_factory):
    cfg = config_from_dict(tiny_config(name="rec", federation={"rounds": 2},
                                       strategy={"name": "fedbip", "params": PARAMS}))
    out = tmp_path_factory.mktemp("rec")
    summary = record_run(cfg, out, echo=lambda s: None)
    return cfg, out, summary


def test_recover_deltas_inverts_the_server_step():
    rng = np.random.default_rng(0)
    before, tau = (rng.normal(size=(3, 50)).astype(np.float32),
                   rng.normal(size=(3, 50)).astype(np.float32))
    w = np.array([[0.6, 0.3, 0.1], [0.2, 0.8, 0.0], [0.1, 0.1, 0.8]])
    after = before + (w.astype(np.float32) @ tau)
    assert np.allclose(recover_deltas(before, after, w), tau, atol=1e-4)
    with pytest.raises(ValueError, match="ill-conditioned"):
        recover_deltas(before, after, np.full((3, 3), 1 / 3))  # FedAvg rows: singular


def test_replaying_the_recorded_parameters_reproduces_the_run(recorded):
    cfg, out, _ = recorded
    rec = load_recording(out)
    assert [r[0] for r in rec.rounds] == [1, 2]
    assert all(r[2].shape == (4, rec.init.shape[0]) for r in rec.rounds)
    from safetensors.numpy import load_file

    w = load_file(str(out / "replay" / "round_00002.safetensors"))["weights"]
    assert not np.allclose(w, np.eye(4))  # a real mixing matrix was inverted
    final = read_latest(out / "checkpoints").tensors["states"]
    replayed = replay_states(rec, "fedbip", PARAMS)
    scale = float(np.abs(final - rec.init).max())
    assert np.abs(replayed - final).max() < 1e-4 * scale
    # other parameters give other states (the replay is not a no-op)
    local = replay_states(rec, "local", {})
    assert np.abs(local - final).max() > 1e-2 * scale


def test_replay_search_picks_by_validation_and_writes_best_config(recorded, tmp_path):
    cfg, out, _ = recorded
    tune_cfg = {**tiny_config(name="rec", federation={"rounds": 2},
                              strategy={"name": "fedbip", "params": PARAMS}),
                "tune": {"num_samples": 3, "seed": 1, "space": {
                    "strategy.params.threshold": {"uniform": [-0.2, 0.6]},
                    "strategy.params.temperature": {"choice": [None, 0.1]}}}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tune_cfg))
    assert main(["replay", str(path), "--recording", str(out),
                 "--output", str(tmp_path / "replay")]) == 0
    s = json.loads((tmp_path / "replay" / "replay_summary.json").read_text())
    vals = [c["last"]["mean_val_accuracy"] for c in s["candidates"]]
    assert len(vals) == 3 and all(0.0 <= v <= 1.0 for v in vals)
    assert s["best"]["metric_value"] == max(vals)
    assert 0.0 <= s["best"]["replay_test_mean_accuracy"] <= 1.0
    best = load_config(tmp_path / "replay" / "best_config.yaml")
    assert best.strategy.params["threshold"] == s["best"]["params"]["strategy.params.threshold"]
    assert best.strategy.params["reference"] == "pretrained"
    # only server-side parameters can be replayed; the recorded setting must match
    path.write_text(yaml.safe_dump({**tune_cfg,
                                    "tune": {"space": {"train.lr": {"choice": [0.1]}}}}))
    with pytest.raises(ConfigError, match="strategy.params"):
        run_replay(path, [], out, tmp_path / "bad")
    path.write_text(yaml.safe_dump(tune_cfg))
    with pytest.raises(ConfigError, match="differs from the config.*train.lr"):
        run_replay(path, ["train.lr=0.5"], out, tmp_path / "bad")


def test_recording_needs_a_checkpoint_every_round(tmp_path):
    cfg = config_from_dict(tiny_config(name="rec2", federation={"rounds": 2, "checkpoint_every": 2},
                                       strategy={"name": "fedbip", "params": PARAMS}))
    with pytest.raises(ConfigError, match="federation.checkpoint_every=2"):
        record_run(cfg, tmp_path / "rec2", echo=lambda s: None)


def _one_error_line(capfd) -> str:
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedbip: error: "), lines
    return lines[0]


def test_replay_command_errors_exit_2_with_one_line(tmp_path, capfd):
    """`fedbip replay` handles errors as `run` and `tune` do; `python -m
    fedbip_ray.tuning.replay` is the same command."""
    tune_cfg = {**tiny_config(name="rec"), "tune": {"space": {"train.lr": {"choice": [0.1]}}}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tune_cfg))
    capfd.readouterr()
    assert main(["replay", str(path), "--recording", str(tmp_path)]) == 2
    assert "replay searches aggregation parameters (strategy.params.*)" in _one_error_line(capfd)
    tune_cfg["tune"] = {"space": {"strategy.params.threshold": {"choice": [0.1]}}}
    path.write_text(yaml.safe_dump(tune_cfg))
    assert replay.main([str(path), "--recording", str(tmp_path / "none")]) == 2
    assert "no recorded task vectors" in _one_error_line(capfd)
    (tmp_path / "garbage.yaml").write_bytes(b"\x00\xff\xfe binary")
    assert main(["replay", str(tmp_path / "garbage.yaml"), "--record"]) == 2
    assert "not a text YAML file" in _one_error_line(capfd)
