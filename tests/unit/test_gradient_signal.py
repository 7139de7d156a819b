"""Optimizer-neutral similarity signal: the negated gradient sum a client sends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.core import AggregationInput, Layout, make_strategy
from fedbip_ray.training.registry import make_trainer

from ..conftest import tiny_config


def _trainer(optimizer: str):
    cfg = config_from_dict(tiny_config(train={"local_epochs": 1, "batch_size": 8, "lr": 0.05,
                                              "optimizer": optimizer}))
    return make_trainer(cfg, 2)


def _data(trainer):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful"]
    frame = pd.DataFrame({"text": [" ".join(rng.choice(words, 6)) for _ in range(24)],
                          "label": rng.integers(0, 2, 24)})
    return trainer.encode(frame)


def _train_with_signal(optimizer: str):
    """One local epoch with the gradient sum on: (trainer, data, task vector, signal)."""
    tr = _trainer(optimizer)
    data = _data(tr)
    start = tr.current_state().copy()
    tr.start_gradient_sum()
    tr.train(data, 1, seed=3)
    signal = tr.stop_gradient_sum()
    return tr, data, tr.current_state() - start, signal


def test_sgd_task_vector_is_lr_times_the_gradient_signal():
    tr, data, tau, signal = _train_with_signal("sgd")
    assert signal is not None and signal.shape == tau.shape and signal.dtype == np.float32
    assert np.abs(signal).max() > 0
    # plain SGD: tau = -lr * sum of gradients = lr * signal
    np.testing.assert_allclose(tau, 0.05 * signal, rtol=1e-3, atol=1e-6)
    assert tr.stop_gradient_sum() is None  # hooks gone, nothing accumulates afterwards
    tr.train(data, 1, seed=4)


def test_adam_task_vector_is_not_the_gradient_direction():
    _, _, tau, signal = _train_with_signal("adamw")
    cos = float(tau @ signal / (np.linalg.norm(tau) * np.linalg.norm(signal)))
    assert 0 < cos < 0.99  # same half-space, but Adam rescales every coordinate


def test_gradient_reference_compares_signals_not_task_vectors():
    layout = Layout.from_shapes({"w": (4,)})
    deltas = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    signals = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=np.float32)
    inp = AggregationInput(states=np.zeros((3, 4), np.float32), deltas=deltas, counts=np.ones(3),
                           layout=layout, init=np.zeros(4, np.float32), signals=signals)
    strat = make_strategy("fedbip", {"reference": "gradient", "gate": []})
    assert strat.client_options.send_gradient
    s = strat.aggregate(inp).similarity
    assert s[0, 2] == pytest.approx(1.0) and s[0, 1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="gradient signals"):
        strat.aggregate(AggregationInput(states=inp.states, deltas=deltas, counts=inp.counts,
                                         layout=layout))
    assert not make_strategy("fedbip").client_options.send_gradient


def test_gradient_reference_with_privacy_is_a_config_error():
    from fedbip_ray.config import ConfigError

    with pytest.raises(ConfigError, match="gradient"):
        config_from_dict(tiny_config(strategy={"name": "fedbip",
                                               "params": {"reference": "gradient"}},
                                     privacy={"clip_norm": 1.0, "noise_multiplier": 1.0}))
