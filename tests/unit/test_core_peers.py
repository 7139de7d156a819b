"""FedSA-LoRA, FedAWA and exact LoRA aggregation (core, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedbip_ray.core.fedawa import awa_gradient, awa_loss, awa_stats, optimize_logits, softmax
from fedbip_ray.core.lora import balanced_split, lora_factor_pairs, lowrank_sum
from fedbip_ray.core.strategies import AggregationInput, make_strategy
from fedbip_ray.core.taskvector import Layout

from .test_core_strategies import LAYOUT  # two LoRA modules (q, v) and a saved head

FAST = settings(max_examples=40, deadline=None)
QA, QB = LAYOUT.index("m.q.lora_A.default.weight"), LAYOUT.index("m.q.lora_B.default.weight")
VA, VB = LAYOUT.index("m.v.lora_A.default.weight"), LAYOUT.index("m.v.lora_B.default.weight")
HEAD = slice(LAYOUT.index("classifier.modules_to_save.default.weight").start, LAYOUT.size)
PAIRS = ((QA, QB), (VA, VB))
PLAIN = {"reference": "round", "lora_product": False, "threshold": None,
         "relative_threshold": False, "self_similarity": "one", "gate": []}


def _input(n=3, seed=0, same_state=True, counts=None):
    rng = np.random.default_rng(seed)
    d = LAYOUT.size
    states = rng.standard_normal((1 if same_state else n, d)).astype(np.float32)
    states = np.repeat(states, n, axis=0) if same_state else states
    return AggregationInput(
        states=states, deltas=rng.standard_normal((n, d)).astype(np.float32),
        counts=np.asarray(counts if counts is not None else rng.integers(1, 50, n)),
        layout=LAYOUT, init=states[0],
    )


def _product(row, a, b):
    return row[b].reshape(4, 2).astype(np.float64) @ row[a].reshape(2, 3).astype(np.float64)


def _best_rank(m, r):
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


# ----------------------------------------------------------------------------- fedsa-lora


def test_fedsa_lora_averages_a_and_keeps_b_and_head_by_hand() -> None:
    states = np.zeros((2, LAYOUT.size), dtype=np.float32)
    deltas = np.stack([np.full(LAYOUT.size, 1.0), np.full(LAYOUT.size, 5.0)]).astype(np.float32)
    inp = AggregationInput(states=states, deltas=deltas, counts=np.array([3, 1]), layout=LAYOUT)
    res = make_strategy("fedsa-lora").aggregate(inp)
    for a in (QA, VA):  # 3/4 * 1 + 1/4 * 5 = 2, for both clients
        assert np.all(res.states[:, a] == 2.0)
    for b in (QB, VB, HEAD):  # own
        assert np.all(res.states[0, b] == 1.0) and np.all(res.states[1, b] == 5.0)
    assert np.allclose(res.weights, [[0.75, 0.25], [0.75, 0.25]])


def test_fedsa_lora_share_modules_to_save_and_errors() -> None:
    inp = _input(n=3, counts=[1, 1, 2])
    res = make_strategy("fedsa-lora", {"share_modules_to_save": True}).aggregate(inp)
    expect = np.array([0.25, 0.25, 0.5], dtype=np.float32) @ inp.theta()[:, HEAD]
    assert np.allclose(res.states[:, HEAD], expect[None, :], atol=1e-6)
    assert np.allclose(res.states[:, QB], inp.theta()[:, QB])
    plain = Layout.from_shapes({"m.q.ia3_l.default": (4, 1)})
    x = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="needs LoRA A factors"):
        make_strategy("fedsa-lora").aggregate(
            AggregationInput(states=x, deltas=x, counts=np.array([1, 1]), layout=plain))
    with pytest.raises(ValueError, match="share_modules_to_save"):
        make_strategy("fedsa-lora", {"share_modules_to_save": "yes"})


# ----------------------------------------------------------------------------- fedawa


def test_fedawa_first_round_by_hand() -> None:
    # theta_g = 0-vector shifted: global (1, 0); client 0 along it, client 1 orthogonal
    lay = Layout.from_shapes({"w": (2,)})
    states = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    theta = np.array([[2.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    inp = AggregationInput(states=states, deltas=theta - states, counts=np.array([5, 5]),
                           layout=lay)
    res = make_strategy("fedawa").aggregate(inp)
    # T starts at the example shares (0.5, 0.5): p = (1/2, 1/2) is what is applied
    assert np.allclose(res.states, [[1.5, 0.5], [1.5, 0.5]])
    assert np.allclose(res.weights, 0.5)
    # equal p and equal distances: dL/dT_k = p_k (C_k - mean C); C = (0, 1 - 1/sqrt 2), so
    # Adam's first step (lr 1e-3, ~sign of the gradient) raises T_0 and lowers T_1
    assert res.memory.shape == (2, 1)
    assert res.memory[:, 0] == pytest.approx([0.5 + 1e-3, 0.5 - 1e-3], abs=1e-7)
    # the next round starts from the carried logits
    nxt = make_strategy("fedawa").aggregate(
        AggregationInput(states=states, deltas=theta - states, counts=np.array([5, 5]),
                         layout=lay, memory=res.memory))
    assert nxt.weights[0] == pytest.approx(softmax(res.memory[:, 0]))
    assert nxt.weights[0, 0] > 0.5


def test_fedawa_sgd_gamma_memory_fallback() -> None:
    inp = _input(n=3, counts=[1, 2, 1])
    stats = awa_stats(inp.theta(), inp.states[0])
    t0 = np.array([0.25, 0.5, 0.25])
    g = awa_gradient(t0, stats)
    p, t1 = optimize_logits(t0, stats, steps=1, optimizer="sgd", lr=0.01)
    assert np.allclose(p, softmax(t0)) and np.allclose(t1, t0 - 0.01 * (g + 5e-4 * t0))
    res = make_strategy("fedawa", {"server_optimizer": "sgd", "gamma": 0.5}).aggregate(inp)
    assert np.allclose(res.states, 0.5 * (softmax(t0).astype(np.float32) @ inp.theta()),
                       atol=1e-6)
    mem = np.array([[2.0], [np.nan], [0.0]])
    res = make_strategy("fedawa").aggregate(
        AggregationInput(states=inp.states, deltas=inp.deltas, counts=inp.counts,
                         layout=LAYOUT, memory=mem))
    assert res.weights[0] == pytest.approx(softmax([2.0, 0.5, 0.0]))
    assert np.allclose(res.states, res.states[0:1])
    for bad in ({"server_epochs": 0}, {"server_optimizer": "lbfgs"}, {"reg_distance": "l1"},
                {"gamma": 0}, {"server_lr": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_strategy("fedawa", bad)


@FAST
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.sampled_from(["cos", "euc"]))
def test_fedawa_gradient_matches_finite_differences(n: int, seed: int, dist: str) -> None:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((n, 7)).astype(np.float32)
    global_ = rng.standard_normal(7).astype(np.float32)
    stats = awa_stats(theta, global_, dist)
    t = rng.standard_normal(n)
    num = np.array([(awa_loss(t + e, stats) - awa_loss(t - e, stats)) / 2e-6
                    for e in np.eye(n) * 1e-6])
    assert np.allclose(awa_gradient(t, stats), num, atol=1e-5)
    # the Gram of centered vectors gives the loss of the plain definition
    p = softmax(t)
    tau = theta.astype(np.float64) - global_  # the client vectors
    cos = (theta @ global_) / np.linalg.norm(theta, axis=1) / np.linalg.norm(global_)
    cost = 1 - cos if dist == "cos" else np.mean(tau**2, axis=1)
    assert np.allclose(stats.cost, cost, atol=1e-6)
    direct = p @ cost + p @ np.linalg.norm(tau - p @ tau, axis=1)
    assert awa_loss(t, stats) == pytest.approx(direct, rel=1e-6)


def test_fedawa_more_steps_lower_the_loss() -> None:
    inp = _input(n=5, seed=3)
    stats = awa_stats(inp.theta(), inp.states[0])
    t0 = np.full(5, 0.2)
    _, t = optimize_logits(t0, stats, steps=200, optimizer="adam", lr=0.05)
    assert awa_loss(t, stats) < awa_loss(t0, stats) - 1e-3


# ----------------------------------------------------------------------------- exact LoRA


@FAST
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 7), st.integers(2, 7),
       st.integers(0, 2**31 - 1))
def test_lowrank_sum_exact_at_full_rank(n: int, r: int, d_out: int, d_in: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bs, as_ = rng.standard_normal((n, d_out, r)), rng.standard_normal((n, r, d_in))
    c = rng.random(n)
    b, a = lowrank_sum(bs, as_, c, n * r)
    assert b.shape == (d_out, n * r) and a.shape == (n * r, d_in)
    target = np.einsum("k,kij->ij", c, bs @ as_)
    assert np.allclose(b @ a, target, atol=1e-9 * max(1.0, np.abs(target).max()))
    assert np.allclose(b.T @ b, a @ a.T, atol=1e-8)  # balanced


@FAST
@given(st.integers(2, 4), st.integers(1, 3), st.integers(3, 8), st.integers(3, 8),
       st.integers(0, 2**31 - 1))
def test_lowrank_sum_is_the_best_rank_r_approximation(n, r, d_out, d_in, seed) -> None:
    rng = np.random.default_rng(seed)
    bs, as_ = rng.standard_normal((n, d_out, r)), rng.standard_normal((n, r, d_in))
    c = rng.random(n) - 0.3
    target = np.einsum("k,kij->ij", c, bs @ as_)
    s = np.linalg.svd(target, compute_uv=False)
    assume(r < s.size and s[r - 1] - s[r] > 1e-3 * s[0])  # the best rank-r matrix is unique
    b, a = lowrank_sum(bs, as_, c, r)
    assert np.allclose(b @ a, _best_rank(target, r), atol=1e-8 * s[0])
    assert np.linalg.norm(target - b @ a) == pytest.approx(np.sqrt((s[r:] ** 2).sum()), rel=1e-7)


def test_balanced_split_aligns_to_reference_and_pads() -> None:
    rng = np.random.default_rng(1)
    ref_b, ref_a = rng.standard_normal((5, 2)), rng.standard_normal((2, 4))
    u, s, vt = np.linalg.svd(ref_b @ ref_a, full_matrices=False)
    b0, a0 = balanced_split(u, s, vt, 2)
    b1, a1 = balanced_split(u, s, vt, 2, ref_b, ref_a)
    assert np.allclose(b1 @ a1, ref_b @ ref_a) and np.allclose(b0 @ a0, ref_b @ ref_a)
    dist = lambda b, a: np.sum((b - ref_b) ** 2) + np.sum((a - ref_a) ** 2)  # noqa: E731
    assert dist(b1, a1) <= dist(b0, a0) + 1e-12
    # a rank-1 sum into rank 2: the free direction keeps B at 0 and A from the reference
    b, a = balanced_split(u[:, :1], s[:1], vt[:1], 2, ref_b, ref_a)
    assert np.allclose(b[:, 1], 0) and np.allclose(a[1], ref_a[1])
    assert np.allclose(b @ a, (u[:, :1] * s[:1]) @ vt[:1])


def test_lora_factor_pairs_reads_peft_names() -> None:
    pairs = lora_factor_pairs(LAYOUT)
    assert [(p.key, p.r, p.d_in, p.d_out) for p in pairs] == [("m.q", 2, 3, 4), ("m.v", 2, 3, 4)]
    conv = Layout.from_shapes({"c.lora_A.default.weight": (2, 6, 1, 1),
                               "c.lora_B.default.weight": (5, 2, 1, 1)})
    assert [(p.r, p.d_in, p.d_out) for p in lora_factor_pairs(conv)] == [(2, 6, 5)]


@pytest.mark.parametrize("name", ["fedbip", "fedbip-layer"])
@pytest.mark.parametrize("same_state", [True, False])
def test_fedbip_lora_exact_is_the_truncated_delta_w_rule(name: str, same_state: bool) -> None:
    inp = _input(n=3, seed=7, same_state=same_state)
    exact = make_strategy(name, {**PLAIN, "lora_exact": True}).aggregate(inp)
    plain = make_strategy(name, PLAIN).aggregate(inp)
    assert np.isfinite(exact.states).all()
    assert np.array_equal(exact.states[:, HEAD], plain.states[:, HEAD])  # not LoRA: unchanged
    assert np.allclose(exact.weights, plain.weights)
    theta = inp.theta()
    for g, (a, b) in enumerate(PAIRS):
        w = exact.weights if name == "fedbip" else exact.layer_weights[g]
        for i in range(inp.n):
            target = _product(inp.states[i], a, b) + sum(
                w[i, k] * (_product(theta[k], a, b) - _product(inp.states[k], a, b))
                for k in range(inp.n))
            if same_state:
                direct = sum(w[i, k] * _product(theta[k], a, b) for k in range(inp.n))
                assert np.allclose(target, direct, atol=1e-5)
            got = _product(exact.states[i], a, b)
            assert np.allclose(got, _best_rank(target, 2), atol=1e-4)
        assert not np.allclose(exact.states[:, a], plain.states[:, a], atol=1e-3)


def test_lora_exact_param_is_validated_and_off_by_default() -> None:
    assert make_strategy("fedbip").lora_exact is False
    assert make_strategy("fedbip-layer", {"lora_exact": True}).lora_exact is True
    with pytest.raises(ValueError, match="lora_exact"):
        make_strategy("fedbip", {"lora_exact": 1})
