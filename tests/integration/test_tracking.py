"""Tracking helpers without a server: URIs, byte totals, run status, git tags, local adapters."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.tracking import mlflow_logger as ml
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
    assert ml.byte_totals(rows) == {"bytes_in_total": 15.0, "bytes_out_total": 3.0, "bytes_total": 18.0}
    assert ml.run_status_for(RuntimeError()) == "FAILED"
    assert ml.run_status_for(KeyboardInterrupt()) == "KILLED"
    assert ml.run_status_for(SystemExit(0)) == "KILLED"


def test_git_tags_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setattr(ml, "_git", lambda *a: None)  # e.g. a `ray job submit` working dir
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
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="no adapter for client 2"):
        load_client_adapter(tmp_path, 2, cfg)
