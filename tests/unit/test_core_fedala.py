"""FedALA: the adaptive local aggregation rule (core, no Ray) and its torch loop on a tiny
model built from a config."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.fedala import (
    ala_converged,
    ala_mix,
    ala_slice,
    ala_step,
    higher_columns,
)
from fedbip_ray.core.interface import ALAOptions
from fedbip_ray.core.strategies import AggregationInput, make_strategy
from fedbip_ray.core.taskvector import Layout

from .test_core_strategies import LAYOUT  # two LoRA modules (q, v) and a saved head


def test_higher_columns_are_the_last_tensors_in_model_order() -> None:
    lay = Layout.from_shapes({"a": (2,), "b": (3,), "c": (1,)})
    assert higher_columns(lay, 1).tolist() == [5]
    assert higher_columns(lay, 2).tolist() == [2, 3, 4, 5]
    assert higher_columns(lay, 0).tolist() == list(range(6))  # 0 = every tensor
    # the model's order, not the layout's sorted one: "a" is the model's last tensor
    assert higher_columns(lay, 1, order=["b", "c", "a"]).tolist() == [0, 1]


def test_ala_mix_and_step_by_hand() -> None:
    local = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    glob = np.array([5.0, 6.0, 7.0, 8.0], dtype=np.float32)
    cols = np.array([2, 3])
    # lower columns take the global values; higher: θ + (g − θ) ⊙ W
    out = ala_mix(local, glob, np.array([0.0, 0.25]), cols)
    assert out.tolist() == [5.0, 6.0, 3.0, 5.0]
    # W − η · grad ⊙ (g − θ), clipped to [0, 1]
    w = ala_step(np.array([1.0, 0.5, 0.5]), np.array([0.1, -0.1, 0.5]), np.array([4.0, 1.0, 2.0]),
                 eta=0.5)
    assert np.allclose(w, [0.8, 0.55, 0.0]) and w.dtype == np.float32
    assert ala_step(np.array([1.0]), np.array([-1.0]), np.array([1.0]), 1.0).tolist() == [1.0]


def test_ala_stopping_rule_and_slice() -> None:
    assert not ala_converged([1.0] * 10, num_pre_loss=10, threshold=0.1)  # needs > 10
    assert ala_converged([5.0] + [1.0] * 10, num_pre_loss=10, threshold=0.1)
    assert not ala_converged([1.0, 2.0] * 6, num_pre_loss=10, threshold=0.1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = ala_slice(50, 80, rng)
        assert s.stop - s.start == 40 and 0 <= s.start <= 10


def test_fedala_is_fedavg_on_the_server_with_the_authors_defaults() -> None:
    s = make_strategy("fedala")
    assert s.client_options.ala == ALAOptions(80, 2, 1.0, 0.1, 10)
    rng = np.random.default_rng(0)
    inp = AggregationInput(states=np.zeros((3, LAYOUT.size), np.float32),
                           deltas=rng.standard_normal((3, LAYOUT.size)).astype(np.float32),
                           counts=np.array([1, 1, 2]), layout=LAYOUT)
    res = s.aggregate(inp)
    want = (inp.deltas[0] + inp.deltas[1] + 2 * inp.deltas[2]) / 4
    assert np.allclose(res.states, want[None, :], atol=1e-6)
    with pytest.raises(ValueError, match="layer_idx 99 exceeds"):
        make_strategy("fedala", {"layer_idx": 99}).aggregate(inp)


@pytest.mark.parametrize("params, match", [
    ({"rand_percent": 0}, r"rand_percent must be in \[1, 100\], got 0"),
    ({"layer_idx": -1}, "layer_idx must be an integer >= 0"),
    ({"eta": 0}, "eta must be a finite number > 0"),
    ({"threshold": -1}, "threshold must be"),
    ({"num_pre_loss": 0.5}, "num_pre_loss must be"),
])
def test_fedala_bad_params_one_line(params, match) -> None:
    with pytest.raises(ValueError, match=match) as err:
        make_strategy("fedala", params)
    assert "\n" not in str(err.value)


def test_adaptive_local_aggregation_learns_weights_on_a_tiny_model() -> None:
    """On tiny-bert: W leaves 1, the start state is neither the global nor the local model,
    the lower layers take the global values, and a later call runs one epoch."""
    pytest.importorskip("torch")
    import pandas as pd

    from fedbip_ray.config import config_from_dict
    from fedbip_ray.training.ala import adaptive_local_aggregation, model_order
    from fedbip_ray.training.sequence import SequenceTrainer

    from ..conftest import tiny_config

    cfg = config_from_dict(tiny_config(strategy={"name": "fedala"}))
    tr = SequenceTrainer(cfg, num_labels=2)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    frame = pd.DataFrame({"text": [" ".join(rng.choice(words, 5)) for _ in range(40)],
                          "label": rng.integers(0, 2, 40)})
    data = tr.encode(frame)
    local = tr.initial_state()
    glob = local + rng.standard_normal(local.shape).astype(np.float32) * 0.5
    opts = ALAOptions(rand_percent=80, layer_idx=2, eta=1.0, threshold=10.0, num_pre_loss=2)
    out = adaptive_local_aggregation(tr, data, local, glob, None, opts, seed=0)
    cols = higher_columns(tr.layout, 2, model_order(tr))
    assert out.weights is not None and out.weights.shape == (cols.size,)
    assert np.all((out.weights >= 0) & (out.weights <= 1)) and not np.all(out.weights == 1)
    assert out.epochs == 3  # first time: until more than num_pre_loss losses, std < threshold
    lower = np.setdiff1d(np.arange(local.size), cols)
    assert np.array_equal(out.state[lower], glob[lower])
    assert np.allclose(out.state[cols], local[cols] + (glob - local)[cols] * out.weights)
    assert not np.array_equal(out.state, glob) and not np.array_equal(out.state, local)
    assert np.array_equal(tr.current_state(), out.state)
    again = adaptive_local_aggregation(tr, data, out.state, glob, out.weights, opts, seed=1)
    assert again.epochs == 1
