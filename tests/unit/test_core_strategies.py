"""Strategies, registry and wrappers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbip_ray.core.aggregate import aggregate_layerwise, aggregate_task_vectors, mix_models
from fedbip_ray.core.similarity import cosine_similarity, similarity_matrix
from fedbip_ray.core.strategies import (
    STRATEGIES,
    AggregationInput,
    ClientOptions,
    ClippedStrategy,
    GaussianNoiseStrategy,
    Strategy,
    make_strategy,
    strategy_param_names,
)
from fedbip_ray.core.taskvector import Layout, module_groups
from fedbip_ray.core.weights import personalized_weights

FAST = settings(max_examples=50, deadline=None)

LAYOUT = Layout.from_shapes(
    {
        "m.q.lora_A.default.weight": (2, 3),
        "m.q.lora_B.default.weight": (4, 2),
        "m.v.lora_A.default.weight": (2, 3),
        "m.v.lora_B.default.weight": (4, 2),
        "classifier.modules_to_save.default.weight": (2, 4),
        "classifier.modules_to_save.default.bias": (2,),
    }
)


# The paper-like option set (flat per-round vectors, absolute threshold, S_ii = 1); the
# properties below are stated for it. The shipped ``fedbip`` defaults are tested separately.
FLAT = {"reference": "round", "lora_product": False, "threshold": None,
        "relative_threshold": False, "self_similarity": "one"}


def fb(name, params=None):
    """make_strategy with FLAT under the given params for fedbip / fedbip-layer."""
    if name in ("fedbip", "fedbip-layer"):
        return make_strategy(name, {**FLAT, **dict(params or {})})
    return make_strategy(name, params)


def make_input(n: int = 5, seed: int = 0, **kwargs) -> AggregationInput:
    rng = np.random.default_rng(seed)
    d = LAYOUT.size
    defaults = dict(
        states=rng.standard_normal((n, d)).astype(np.float32),
        deltas=rng.standard_normal((n, d)).astype(np.float32),
        counts=rng.integers(1, 100, n),
        layout=LAYOUT,
    )
    defaults.update(kwargs)
    return AggregationInput(**defaults)


# ----------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(STRATEGIES) == {
        "local",
        "fedavg",
        "fedavg-ft",
        "fedprox",
        "fedamp",
        "fedbip-paper",
        "fedbip",
        "fedbip-layer",
        "oracle",
        "fedsa-lora",
        "fedawa",
        "fedala",
        "feddpa",
    }
    for name in STRATEGIES:
        strategy = make_strategy(name)
        assert strategy.name == name
        assert isinstance(strategy, Strategy)
        assert isinstance(strategy.client_options, ClientOptions)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedx' \(known: local, fedavg"):
        make_strategy("fedx")
    with pytest.raises(ValueError, match="unknown parameter 'treshold'.*valid: threshold"):
        make_strategy("fedbip", {"treshold": 0.1})
    with pytest.raises(ValueError, match="'fedavg' .*takes no parameters"):
        make_strategy("fedavg", {"mu": 1})
    with pytest.raises(ValueError, match="threshold"):
        make_strategy("fedbip", {"threshold": 3})
    with pytest.raises(ValueError, match="reference"):
        make_strategy("fedbip", {"reference": "global"})
    with pytest.raises(ValueError, match="scope"):
        make_strategy("fedbip", {"scope": "modules"})
    with pytest.raises(ValueError, match="prox_mu"):
        make_strategy("fedprox", {"prox_mu": -1})
    with pytest.raises(ValueError, match="smoothing"):
        make_strategy("fedbip", {"smoothing": 1.0})
    with pytest.raises(ValueError, match="unknown strategy"):
        strategy_param_names("nope")


def test_param_names_and_client_options() -> None:
    assert strategy_param_names("local") == ()
    names = strategy_param_names("fedbip")
    for p in ("threshold", "clip_negative", "temperature", "top_k", "reference", "scope"):
        assert p in names
    assert "scope" not in strategy_param_names("fedbip-layer")
    assert make_strategy("fedprox").client_options == ClientOptions(prox_mu=0.01)
    assert fb("fedavg-ft", {"finetune_epochs": 2}).client_options == ClientOptions(
        finetune_epochs_before_eval=2
    )
    assert fb("fedamp", {"prox_mu": 0.5}).client_options.prox_mu == 0.5
    s = fb("fedbip", {"modules": ["classifier"], "scope": "modules", "top_k": 2.0})
    assert s.modules == ("classifier",) and s.top_k == 2


# ----------------------------------------------------------------------------- strategies


def test_fedbip_paper_hand_example() -> None:
    # Same numbers as test_core_weights.HAND_*: S = [[1,.6,0],[.6,1,.8],[0,.8,1]].
    layout = Layout.from_shapes({"w": (2,)})
    inp = AggregationInput(
        states=np.array([[0, 0], [1, 1], [2, 0]], np.float32),
        deltas=np.array([[1, 0], [3, 4], [0, 2]], np.float32),
        counts=np.array([1, 1, 1]),
        layout=layout,
    )
    res = fb("fedbip-paper").aggregate(inp)
    np.testing.assert_allclose(
        res.states, [[1.75, 1.5], [2.5, 10 / 3], [10 / 3, 26 / 9]], atol=1e-6
    )
    np.testing.assert_allclose(res.weights[1], [1 / 4, 5 / 12, 1 / 3])
    assert res.states.dtype == np.float32


def test_local_fedavg_oracle() -> None:
    inp = make_input(groups=np.array([0, 1, 0, 1, 1]))
    theta = inp.states + inp.deltas
    np.testing.assert_array_equal(fb("local").aggregate(inp).states, theta)
    res = fb("fedavg").aggregate(inp)
    avg = (inp.counts[:, None] * theta.astype(np.float64)).sum(0) / inp.counts.sum()
    np.testing.assert_allclose(res.states, np.tile(avg, (5, 1)), atol=1e-5)
    assert res.states.dtype == np.float32 and res.states.shape == theta.shape
    ores = fb("oracle").aggregate(inp)
    assert np.all(ores.weights[np.ix_([0, 2], [1, 3, 4])] == 0)
    np.testing.assert_allclose(ores.states[0], ores.states[2], atol=1e-6)
    np.testing.assert_allclose(ores.states[1], ores.states[4], atol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        fb("oracle").aggregate(make_input())


def test_fedamp_mixes_theta() -> None:
    inp = make_input()
    res = fb("fedamp", {"sigma": 50.0, "alpha_k": 0.5}).aggregate(inp)
    np.testing.assert_allclose(res.weights.sum(1), 1.0)
    np.testing.assert_allclose(res.states, mix_models(inp.theta(), res.weights), atol=1e-6)


def test_fedbip_threshold_minus_one_no_clip_is_paper() -> None:
    inp = make_input()
    paper = fb("fedbip-paper").aggregate(inp)
    ours = fb("fedbip", {"threshold": -1.0, "clip_negative": False}).aggregate(inp)
    np.testing.assert_array_equal(ours.weights, paper.weights)
    np.testing.assert_array_equal(ours.states, paper.states)


@FAST
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.sampled_from(["fedbip", "fedbip-layer"]))
def test_top_k_one_is_local_training(n: int, seed: int, name: str) -> None:
    inp = make_input(n, seed)
    res = fb(name, {"top_k": 1}).aggregate(inp)
    np.testing.assert_allclose(res.states, inp.states + inp.deltas, atol=1e-6)


@FAST
@given(
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
    st.lists(st.floats(0.1, 10.0), min_size=6, max_size=6),
    st.booleans(),
)
def test_identical_task_vectors_give_fedavg_of_deltas(
    n: int, seed: int, scales: list[float], clip: bool
) -> None:
    rng = np.random.default_rng(seed)
    tau = rng.standard_normal(LAYOUT.size).astype(np.float32)
    deltas = (np.array(scales[:n], np.float32)[:, None] * tau[None, :]).astype(np.float32)
    inp = make_input(n, seed, deltas=deltas)
    res = fb("fedbip", {"clip_negative": clip}).aggregate(inp)
    np.testing.assert_allclose(res.weights, np.full((n, n), 1 / n), atol=1e-6)
    expected = inp.states + deltas.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(res.states, expected, rtol=1e-5, atol=1e-5)


fedbip_params = st.fixed_dictionaries(
    {
        "threshold": st.none() | st.floats(-1.0, 1.0),
        "clip_negative": st.booleans(),
        "temperature": st.none() | st.floats(0.05, 5.0),
        "top_k": st.none() | st.integers(1, 7),
        "center": st.booleans(),
        "lora_product": st.booleans(),
    }
)


@FAST
@given(
    st.integers(1, 7),
    st.integers(0, 2**31 - 1),
    fedbip_params,
    st.sampled_from(["fedbip", "fedbip-layer"]),
    st.randoms(use_true_random=False),
)
def test_fedbip_permutation_equivariant(n, seed, params, name, rnd) -> None:
    inp = make_input(n, seed)
    perm = np.array(rnd.sample(range(n), n))
    permuted = dataclasses.replace(
        inp, states=inp.states[perm], deltas=inp.deltas[perm], counts=inp.counts[perm]
    )
    strategy = fb(name, params)
    res, res_p = strategy.aggregate(inp), strategy.aggregate(permuted)
    np.testing.assert_allclose(res_p.similarity, res.similarity[np.ix_(perm, perm)], atol=1e-6)
    np.testing.assert_allclose(res_p.weights, res.weights[np.ix_(perm, perm)], atol=1e-6)
    np.testing.assert_allclose(res_p.states, res.states[perm], rtol=1e-5, atol=1e-5)


def test_fedbip_reference_pretrained_and_lora_product() -> None:
    init = np.random.default_rng(9).standard_normal(LAYOUT.size).astype(np.float32)
    inp = make_input(init=init)
    res = fb("fedbip", {"reference": "pretrained"}).aggregate(inp)
    np.testing.assert_allclose(res.similarity, cosine_similarity(inp.theta() - init), atol=1e-6)
    # the per-round deltas are what gets aggregated
    np.testing.assert_allclose(
        res.states, aggregate_task_vectors(inp.states, inp.deltas, res.weights), atol=1e-6
    )
    with pytest.raises(ValueError, match="init"):
        fb("fedbip", {"reference": "pretrained"}).aggregate(make_input())
    res = fb("fedbip", {"lora_product": True}).aggregate(inp)
    expected = similarity_matrix(inp.theta(), LAYOUT, lora_product=True, base=inp.states)
    np.testing.assert_allclose(res.similarity, expected)


def test_fedbip_modules_scope_and_smoothing() -> None:
    inp = make_input()
    res = fb("fedbip", {"scope": "modules", "modules": ("classifier",)}).aggregate(inp)
    cols = slice(LAYOUT.index("classifier.modules_to_save.default.weight").start, None)
    np.testing.assert_allclose(res.similarity, cosine_similarity(inp.deltas[:, cols]), atol=1e-6)
    prev = np.eye(5)
    plain = fb("fedbip").aggregate(inp)
    smoothed = fb("fedbip", {"smoothing": 0.5}).aggregate(
        dataclasses.replace(inp, prev_similarity=prev)
    )
    np.testing.assert_allclose(smoothed.similarity, 0.5 * prev + 0.5 * plain.similarity)


def test_fedbip_layer() -> None:
    inp = make_input()
    res = fb("fedbip-layer", {"clip_negative": False, "threshold": -1.0}).aggregate(inp)
    groups = module_groups(LAYOUT)
    assert res.layer_names == tuple(groups)
    assert res.layer_weights.shape == (3, 5, 5)
    assert res.layer_similarity.shape == (3, 5, 5)
    np.testing.assert_allclose(res.layer_weights.sum(axis=2), 1.0)
    np.testing.assert_allclose(res.weights, res.layer_weights.mean(axis=0))
    for (key, idx), w in zip(groups.items(), res.layer_weights, strict=True):
        np.testing.assert_allclose(
            res.states[:, idx], inp.states[:, idx] + w @ inp.deltas[:, idx], atol=1e-5
        )
        s = cosine_similarity(inp.deltas[:, idx])
        np.testing.assert_allclose(w, personalized_weights(s), atol=1e-6, err_msg=key)
    prev = np.stack([np.eye(5)] * 3)
    smoothed = fb("fedbip-layer", {"smoothing": 0.5}).aggregate(
        dataclasses.replace(inp, prev_similarity=prev)
    )
    np.testing.assert_allclose(
        smoothed.layer_similarity, 0.5 * prev + 0.5 * res.layer_similarity, atol=1e-12
    )


def test_aggregate_layerwise_requires_partition() -> None:
    states = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="partition"):
        aggregate_layerwise(states, states, np.stack([np.eye(2)]), [np.array([0, 1, 2])])
    out = aggregate_layerwise(
        states,
        np.ones((2, 4), np.float32),
        np.stack([np.eye(2), np.full((2, 2), 0.5)]),
        [np.array([0, 2]), np.array([1, 3])],
    )
    np.testing.assert_allclose(out, np.ones((2, 4)))


def test_aggregation_input_validation() -> None:
    with pytest.raises(ValueError, match="one shape"):
        make_input(deltas=np.zeros((4, LAYOUT.size), np.float32))
    with pytest.raises(ValueError, match="D="):
        make_input(states=np.zeros((5, 3), np.float32), deltas=np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="counts"):
        make_input(counts=np.ones(4))
    with pytest.raises(ValueError, match="init"):
        make_input(init=np.zeros(3))
    with pytest.raises(ValueError, match="prev_similarity"):
        make_input(prev_similarity=np.eye(4))


# ----------------------------------------------------------------------------- wrappers


def test_clipped_strategy() -> None:
    inp = make_input()
    res = ClippedStrategy(fb("local"), max_norm=0.5).aggregate(inp)
    norms = np.linalg.norm(res.states - inp.states, axis=1)
    np.testing.assert_allclose(norms, 0.5, rtol=1e-5)
    small = ClippedStrategy(fb("local"), max_norm=1e6).aggregate(inp)
    np.testing.assert_array_equal(small.states, inp.states + inp.deltas)
    wrapped = ClippedStrategy(fb("fedprox"), 1.0)
    assert wrapped.client_options.prox_mu == 0.01
    with pytest.raises(ValueError, match="max_norm"):
        ClippedStrategy(fb("local"), max_norm=0.0)


def test_gaussian_noise_strategy() -> None:
    inp = make_input(n=4)
    no_noise = GaussianNoiseStrategy(fb("local"), clip=0.5, noise_multiplier=0.0)
    clipped = ClippedStrategy(fb("local"), 0.5).aggregate(inp)
    np.testing.assert_allclose(no_noise.aggregate(inp).states, clipped.states, rtol=1e-6, atol=1e-7)
    a = GaussianNoiseStrategy(fb("local"), clip=0.5, noise_multiplier=2.0, seed=3)
    b = GaussianNoiseStrategy(fb("local"), clip=0.5, noise_multiplier=2.0, seed=3)
    first = a.aggregate(inp).states
    np.testing.assert_array_equal(first, b.aggregate(inp).states)
    np.testing.assert_array_equal(first, a.aggregate(inp).states)  # the seed sets the noise
    other = GaussianNoiseStrategy(fb("local"), clip=0.5, noise_multiplier=2.0, seed=4)
    assert not np.array_equal(first, other.aggregate(inp).states)
    noise = first - clipped.states
    assert 0.7 < noise.std() < 1.3  # noise_multiplier * clip = 1.0


def test_default_fedbip_recovers_groups_where_the_paper_rule_stays_local() -> None:
    """Two groups of 3 clients whose LoRA updates share a large common part and differ by a
    small group-specific part (as when fine-tuning conflicting labels): the paper rule keeps
    most weight on self, the shipped defaults weigh the own group ~uniformly and the other 0."""
    rng = np.random.default_rng(0)
    layout = Layout.from_shapes({"m.lora_A.weight": (2, 16), "m.lora_B.weight": (16, 2),
                                 "head.weight": (2, 8)})
    n, d = 6, layout.size
    groups = np.array([0, 1, 0, 1, 0, 1])
    init = np.zeros(d, dtype=np.float32)
    init[layout.index("m.lora_A.weight")] = rng.standard_normal(32)
    shared = rng.standard_normal(d).astype(np.float32)
    specific = rng.standard_normal((2, d)).astype(np.float32)
    deltas = np.stack([shared + 0.6 * specific[g] + 0.3 * rng.standard_normal(d) for g in groups])
    deltas[:, layout.index("m.lora_A.weight")] *= 0.05
    inp = AggregationInput(states=np.tile(init, (n, 1)), deltas=deltas.astype(np.float32),
                           counts=np.full(n, 10), layout=layout, init=init)
    same = groups[:, None] == groups[None, :]
    ours = make_strategy("fedbip").aggregate(inp).weights
    paper = make_strategy("fedbip-paper").aggregate(inp).weights
    np.testing.assert_allclose(ours.sum(axis=1), 1.0)
    assert (ours[~same] == 0).all()
    assert np.abs(ours[same] - 1 / 3).max() < 0.1
    assert (paper * same).sum(axis=1).mean() < (ours * same).sum(axis=1).mean()
