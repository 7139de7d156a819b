"""Similarity: cosine, scopes, LoRA product, smoothing and group recovery."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbip_ray.core.grouping import (
    _average_linkage_numpy,
    adjusted_rand_index,
    cluster_similarity,
    group_recovery,
)
from fedbip_ray.core.similarity import (
    cosine_similarity,
    lora_pairs,
    per_module_similarity,
    similarity_matrix,
    smooth_similarity,
)
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.core.weights import personalized_weights

FAST = settings(max_examples=50, deadline=None)

A_Q = "m.layer.0.q.lora_A.default.weight"
B_Q = "m.layer.0.q.lora_B.default.weight"
A_V = "m.layer.0.v.lora_A.default.weight"
B_V = "m.layer.0.v.lora_B.default.weight"
HEAD_W = "m.classifier.modules_to_save.default.weight"
HEAD_B = "m.classifier.modules_to_save.default.bias"


def lora_layout(r: int = 2, d_in: int = 5, d_out: int = 4) -> Layout:
    return Layout.from_shapes(
        {
            A_Q: (r, d_in),
            B_Q: (d_out, r),
            A_V: (r, d_in),
            B_V: (d_out, r),
            HEAD_W: (3, d_out),
            HEAD_B: (3,),
        }
    )


def _explicit_delta_w(x: np.ndarray, layout: Layout, base: np.ndarray | None = None) -> np.ndarray:
    """Rows [B_q A_q, B_v A_v, head] formed explicitly (minus the base's), float64."""
    x = x.astype(np.float64)
    b = None if base is None else np.broadcast_to(base, x.shape).astype(np.float64)

    def product(m: np.ndarray, i: int, a: str, bn: str) -> np.ndarray:
        return (
            m[i, layout.index(bn)].reshape(layout.shape(bn))
            @ m[i, layout.index(a)].reshape(layout.shape(a))
        ).ravel()

    rows = []
    for i in range(x.shape[0]):
        parts = [product(x, i, A_Q, B_Q), product(x, i, A_V, B_V)]
        head = np.concatenate([x[i, layout.index(HEAD_W)], x[i, layout.index(HEAD_B)]])
        if b is not None:
            parts = [parts[0] - product(b, i, A_Q, B_Q), parts[1] - product(b, i, A_V, B_V)]
            head = head - np.concatenate([b[i, layout.index(HEAD_W)], b[i, layout.index(HEAD_B)]])
        rows.append(np.concatenate([*parts, head]))
    return np.array(rows)


def test_cosine_by_hand_and_zero_rows() -> None:
    m = np.array([[1, 0], [3, 4], [0, 0], [-2, 0]], dtype=np.float32)
    s = cosine_similarity(m)
    assert s.dtype == np.float64
    np.testing.assert_allclose(
        s,
        [[1, 0.6, 0, -1], [0.6, 1, 0, -0.6], [0, 0, 1, 0], [-1, -0.6, 0, 1]],
        atol=1e-7,
    )
    np.testing.assert_array_equal(cosine_similarity(np.zeros((3, 4), np.float32)), np.eye(3))


@FAST
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_cosine_matches_normalized_rows(n: int, d: int, seed: int) -> None:
    m = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32) * 10
    u = m.astype(np.float64) / np.linalg.norm(m.astype(np.float64), axis=1, keepdims=True)
    s = cosine_similarity(m)
    np.testing.assert_allclose(s, np.clip(u @ u.T, -1, 1), atol=1e-5)
    assert np.all(np.abs(s) <= 1) and np.all(np.diag(s) == 1)
    np.testing.assert_array_equal(s, s.T)


def test_flat_scope_is_cosine() -> None:
    layout = lora_layout()
    x = np.random.default_rng(0).standard_normal((5, layout.size)).astype(np.float32)
    np.testing.assert_allclose(similarity_matrix(x, layout), cosine_similarity(x), atol=1e-12)


def test_center_subtracts_mean_row() -> None:
    layout = lora_layout()
    x = np.random.default_rng(1).standard_normal((6, layout.size)).astype(np.float32) + 3
    expected = cosine_similarity(x.astype(np.float64) - x.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(similarity_matrix(x, layout, center=True), expected, atol=1e-5)


def test_layer_scope_is_mean_of_module_cosines() -> None:
    layout = lora_layout()
    x = np.random.default_rng(2).standard_normal((4, layout.size)).astype(np.float32)
    keys, sims = per_module_similarity(x, layout)
    assert keys == ["m.layer.0.q", "m.layer.0.v", "m.classifier"]
    assert sims.shape == (3, 4, 4)
    cols = {
        "m.layer.0.q": np.r_[layout.index(A_Q), layout.index(B_Q)],
        "m.layer.0.v": np.r_[layout.index(A_V), layout.index(B_V)],
        "m.classifier": np.r_[layout.index(HEAD_W), layout.index(HEAD_B)],
    }
    for key, s in zip(keys, sims, strict=True):
        np.testing.assert_allclose(s, cosine_similarity(x[:, cols[key]]), atol=1e-6)
    np.testing.assert_allclose(similarity_matrix(x, layout, scope="layer"), sims.mean(axis=0))


def test_modules_scope_selects_parameters() -> None:
    layout = lora_layout()
    x = np.random.default_rng(3).standard_normal((4, layout.size)).astype(np.float32)
    head = x[:, layout.index(HEAD_W).start :]
    s = similarity_matrix(x, layout, scope="modules", modules=("classifier",))
    np.testing.assert_allclose(s, cosine_similarity(head), atol=1e-6)
    with pytest.raises(ValueError, match="matches no parameter"):
        similarity_matrix(x, layout, scope="modules", modules=("nothing_here",))
    with pytest.raises(ValueError, match="non-empty modules"):
        similarity_matrix(x, layout, scope="modules")
    with pytest.raises(ValueError, match="unknown similarity scope 'global'"):
        similarity_matrix(x, layout, scope="global")
    with pytest.raises(ValueError, match="D="):
        similarity_matrix(x[:, :-1], layout)


def test_lora_pairs_found() -> None:
    assert lora_pairs(lora_layout()) == {"m.layer.0.q": (A_Q, B_Q), "m.layer.0.v": (A_V, B_V)}
    # mismatched ranks are not paired
    bad = Layout.from_shapes({A_Q: (2, 5), B_Q: (4, 3)})
    assert lora_pairs(bad) == {}


@FAST
@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 6),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_lora_product_equals_explicit_ba(
    n: int, r: int, d_in: int, d_out: int, with_base: bool, seed: int
) -> None:
    layout = lora_layout(r, d_in, d_out)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, layout.size)).astype(np.float32)
    base = rng.standard_normal((n, layout.size)).astype(np.float32) if with_base else None
    got = similarity_matrix(x, layout, lora_product=True, base=base)
    expected = cosine_similarity(_explicit_delta_w(x, layout, base))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    keys, sims = per_module_similarity(x, layout, lora_product=True, base=base)
    dw = _explicit_delta_w(x, layout, base)
    q = dw[:, : d_out * d_in]
    np.testing.assert_allclose(sims[keys.index("m.layer.0.q")], cosine_similarity(q), atol=2e-5)


def test_lora_product_with_shared_base_vector() -> None:
    layout = lora_layout()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, layout.size)).astype(np.float32)
    init = rng.standard_normal(layout.size).astype(np.float32)
    got = similarity_matrix(x, layout, lora_product=True, base=init)
    expected = cosine_similarity(_explicit_delta_w(x, layout, init[None, :]))
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_lora_product_centered_matches_explicit() -> None:
    layout = lora_layout()
    x = np.random.default_rng(5).standard_normal((5, layout.size)).astype(np.float32)
    dw = _explicit_delta_w(x, layout)
    expected = cosine_similarity(dw - dw.mean(axis=0))
    got = similarity_matrix(x, layout, lora_product=True, center=True)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_zero_vectors_everywhere() -> None:
    layout = lora_layout()
    x = np.zeros((3, layout.size), np.float32)
    for scope in ("flat", "layer"):
        np.testing.assert_array_equal(similarity_matrix(x, layout, scope=scope), np.eye(3))
    np.testing.assert_array_equal(similarity_matrix(x, layout, lora_product=True), np.eye(3))
    np.testing.assert_array_equal(similarity_matrix(x, layout, center=True), np.eye(3))


def test_smooth_similarity() -> None:
    cur = np.array([[1.0, 0.2], [0.2, 1.0]])
    prev = np.array([[1.0, 0.6], [0.6, 1.0]])
    np.testing.assert_array_equal(smooth_similarity(None, cur, 0.9), cur)
    np.testing.assert_allclose(smooth_similarity(prev, cur, 0.75)[0, 1], 0.75 * 0.6 + 0.25 * 0.2)
    with pytest.raises(ValueError, match="beta"):
        smooth_similarity(prev, cur, 1.5)
    with pytest.raises(ValueError, match="shape"):
        smooth_similarity(np.eye(3), cur, 0.5)


def test_adjusted_rand_index_known_values() -> None:
    assert adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    # scikit-learn documentation examples
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.5714285714285714)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(0.5714285714285714)


def _block_similarity(groups: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((groups.max() + 1, 50))
    vecs = centers[groups] + 0.3 * rng.standard_normal((groups.size, 50))
    return cosine_similarity(vecs)


def test_group_recovery_perfect_blocks() -> None:
    groups = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    s = _block_similarity(groups, 0)
    w = personalized_weights(s, threshold=0.5)
    rec = group_recovery(s, w, groups)
    assert set(rec) == {
        "in_group_weight_share",
        "in_group_similarity",
        "cross_group_similarity",
        "adjusted_rand_index",
    }
    assert rec["adjusted_rand_index"] == 1.0
    assert rec["in_group_weight_share"] == pytest.approx(1.0)
    assert rec["in_group_similarity"] > 0.8 > rec["cross_group_similarity"]
    local = group_recovery(s, np.eye(8), groups)
    assert local["in_group_weight_share"] == 1.0
    uniform = group_recovery(s, np.full((8, 8), 1 / 8), groups)
    assert uniform["in_group_weight_share"] == pytest.approx(np.mean([3, 3, 2, 3, 3, 2, 3, 3]) / 8)


def test_numpy_linkage_agrees_with_scipy() -> None:
    groups = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1, 3])
    s = _block_similarity(groups, 1)
    labels_np = _average_linkage_numpy(1 - s, 4)
    assert adjusted_rand_index(labels_np, groups) == 1.0
    assert adjusted_rand_index(cluster_similarity(s, 4), groups) == 1.0
    assert cluster_similarity(s, 10).tolist() == list(range(10))


@pytest.mark.parametrize("lora_product", [False, True])
def test_sum_of_matrices_in_small_column_blocks_equals_the_materialized_sum(monkeypatch,
                                                                            lora_product):
    from fedbip_ray.core import similarity as sim

    layout = Layout.from_shapes({"q.lora_A.weight": (2, 5), "q.lora_B.weight": (3, 2),
                                 "head.weight": (7,)})
    rng = np.random.default_rng(1)
    states = rng.normal(size=(4, layout.size)).astype(np.float32)
    deltas = rng.normal(size=(4, layout.size)).astype(np.float32)
    init = rng.normal(size=layout.size).astype(np.float32)
    want = sim.similarity_matrix(states + deltas, layout, lora_product=lora_product, base=init)
    monkeypatch.setattr(sim, "_PLAIN_BLOCK_ELEMENTS", 8)  # 2 columns per block at N = 4
    lazy = sim.SumOfMatrices(states, deltas)
    got = sim.similarity_matrix(lazy, layout, lora_product=lora_product, base=init)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    _, per = sim.per_module_similarity(lazy, layout, lora_product=lora_product, base=init)
    _, per_want = sim.per_module_similarity(states + deltas, layout, lora_product=lora_product,
                                            base=init)
    np.testing.assert_allclose(per, per_want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="summands"):
        sim.SumOfMatrices(states, deltas[:2])
