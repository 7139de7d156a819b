"""Weight matrices: the paper rule by hand, options, baselines, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedbip_ray.core.aggregate import aggregate_task_vectors
from fedbip_ray.core.similarity import cosine_similarity
from fedbip_ray.core.weights import (
    fedamp_weights,
    fedavg_weights,
    local_weights,
    oracle_weights,
    personalized_weights,
)

FAST = settings(max_examples=50, deadline=None)

# Hand-computed 3-client example of the paper rule.
#   task vectors  tau1 = (1, 0), tau2 = (3, 4), tau3 = (0, 2)
#   norms 1, 5, 2  ->  cos12 = 3/5 = 0.6, cos13 = 0, cos23 = 8/10 = 0.8
#   S = [[1, .6, 0], [.6, 1, .8], [0, .8, 1]],   row sums 1.6, 2.4, 1.8
#   p1 = [1/1.6, .6/1.6, 0]        = [0.625, 0.375, 0]
#   p2 = [.6/2.4, 1/2.4, .8/2.4]   = [1/4, 5/12, 1/3]
#   p3 = [0, .8/1.8, 1/1.8]        = [0, 4/9, 5/9]
#   states s1 = (0, 0), s2 = (1, 1), s3 = (2, 0); new_i = s_i + sum_k p_ik tau_k:
#   new1 = (0, 0) + .625 (1, 0) + .375 (3, 4)                 = (1.75, 1.5)
#   new2 = (1, 1) + 1/4 (1, 0) + 5/12 (3, 4) + 1/3 (0, 2)      = (2.5, 10/3)
#   new3 = (2, 0) + 4/9 (3, 4) + 5/9 (0, 2)                   = (10/3, 26/9)
HAND_TAU = np.array([[1, 0], [3, 4], [0, 2]], dtype=np.float32)
HAND_STATES = np.array([[0, 0], [1, 1], [2, 0]], dtype=np.float32)
HAND_S = np.array([[1, 0.6, 0], [0.6, 1, 0.8], [0, 0.8, 1]])
HAND_P = np.array([[0.625, 0.375, 0], [1 / 4, 5 / 12, 1 / 3], [0, 4 / 9, 5 / 9]])
HAND_NEW = np.array([[1.75, 1.5], [2.5, 10 / 3], [10 / 3, 26 / 9]])


def test_paper_rule_hand_example() -> None:
    s = cosine_similarity(HAND_TAU)
    np.testing.assert_allclose(s, HAND_S, atol=1e-7)
    p = personalized_weights(s)
    np.testing.assert_allclose(p, HAND_P, atol=1e-7)
    new = aggregate_task_vectors(HAND_STATES, HAND_TAU, p)
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, HAND_NEW, atol=1e-6)


def test_paper_rule_treats_diagonal_as_one() -> None:
    s = HAND_S.copy()
    np.fill_diagonal(s, 0.3)
    np.testing.assert_allclose(personalized_weights(s), HAND_P)


def test_threshold_clip_temperature_topk_by_hand() -> None:
    s = np.array([[1.0, 0.5, -0.5], [0.5, 1.0, 0.2], [-0.5, 0.2, 1.0]])
    # threshold 0.3: rows 0 and 1 keep each other (0.5), 0.2 and -0.5 are dropped.
    np.testing.assert_allclose(
        personalized_weights(s, threshold=0.3),
        [[1 / 1.5, 0.5 / 1.5, 0], [0.5 / 1.5, 1 / 1.5, 0], [0, 0, 1]],
    )
    # clip_negative: row 2 drops client 0 -> [0, .2, 1] / 1.2
    np.testing.assert_allclose(
        personalized_weights(s, clip_negative=True)[2], [0, 0.2 / 1.2, 1 / 1.2]
    )
    # temperature: softmax over the whole row 0
    e = np.exp(np.array([1.0, 0.5, -0.5]) / 0.5)
    np.testing.assert_allclose(personalized_weights(s, temperature=0.5)[0], e / e.sum())
    # top_k=2: self plus the single most similar other
    np.testing.assert_allclose(personalized_weights(s, top_k=2)[0], [1 / 1.5, 0.5 / 1.5, 0])
    np.testing.assert_allclose(personalized_weights(s, top_k=1), np.eye(3))


def test_degenerate_rows_fall_back_to_identity() -> None:
    s = np.array([[1.0, -1.0], [-1.0, 1.0]])  # row sums exactly 0
    np.testing.assert_array_equal(personalized_weights(s), np.eye(2))
    s_nan = np.array([[1.0, np.nan, 0.5], [np.nan, 1.0, 0.5], [0.5, 0.5, 1.0]])
    w = personalized_weights(s_nan)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(w[0], [1 / 1.5, 0, 0.5 / 1.5])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -2}, "threshold"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
    ],
)
def test_invalid_options_name_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        personalized_weights(np.eye(2), **kwargs)


def test_not_square_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        personalized_weights(np.ones((2, 3)))


# ----------------------------------------------------------------------------- properties

sim_matrices = st.integers(1, 7).flatmap(
    lambda n: arrays(np.float64, (n, n), elements=st.floats(-1.0, 1.0, width=32))
)
options = st.fixed_dictionaries(
    {
        "threshold": st.none() | st.floats(-1.0, 1.0),
        "clip_negative": st.booleans(),
        "temperature": st.none() | st.floats(0.05, 10.0),
        "top_k": st.none() | st.integers(1, 9),
    }
)


def _assert_rows_sum_to_one(w: np.ndarray) -> None:
    assert w.dtype == np.float64
    assert np.all(np.isfinite(w))
    scale = max(1.0, float(np.abs(w).sum(axis=1).max()))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-9 * scale)


@FAST
@given(sim_matrices, options)
def test_rows_sum_to_one_for_all_options(s: np.ndarray, opts: dict) -> None:
    _assert_rows_sum_to_one(personalized_weights(s, **opts))


@FAST
@given(sim_matrices, options, st.randoms(use_true_random=False))
def test_personalized_weights_permutation_equivariant(s: np.ndarray, opts: dict, rnd) -> None:
    s = (s + s.T) / 2
    perm = np.array(rnd.sample(range(s.shape[0]), s.shape[0]))
    w = personalized_weights(s, **opts)
    wp = personalized_weights(s[np.ix_(perm, perm)], **opts)
    scale = max(1.0, float(np.abs(w).max()))
    np.testing.assert_allclose(wp, w[np.ix_(perm, perm)], rtol=0, atol=1e-9 * scale)


@FAST
@given(sim_matrices)
def test_threshold_minus_one_is_paper_rule(s: np.ndarray) -> None:
    np.testing.assert_array_equal(personalized_weights(s, threshold=-1.0), personalized_weights(s))


@FAST
@given(sim_matrices, options)
def test_top_k_one_is_local(s: np.ndarray, opts: dict) -> None:
    opts = dict(opts, top_k=1)
    np.testing.assert_array_equal(personalized_weights(s, **opts), np.eye(s.shape[0]))


@FAST
@given(sim_matrices, st.floats(-1.0, 1.0), st.floats(0.05, 10.0))
def test_nonnegative_when_clipped(s: np.ndarray, threshold: float, temperature: float) -> None:
    for t in (None, temperature):
        w = personalized_weights(s, threshold=threshold, clip_negative=True, temperature=t)
        assert np.all(w >= 0)
        assert np.all(np.diag(w) > 0)


# ----------------------------------------------------------------------------- baselines


def test_fedavg_and_local_weights() -> None:
    np.testing.assert_allclose(fedavg_weights(np.array([1, 3])), [[0.25, 0.75], [0.25, 0.75]])
    np.testing.assert_allclose(fedavg_weights(np.zeros(4)), np.full((4, 4), 0.25))
    with pytest.raises(ValueError, match="counts"):
        fedavg_weights(np.array([1, -1]))
    np.testing.assert_array_equal(local_weights(3), np.eye(3))


def test_fedamp_hand_case() -> None:
    models = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    # squared distances: d01 = 1, d02 = 9, d12 = 4; xi_ij = alpha * exp(-d / sigma) / sigma
    alpha, sigma = 0.5, 2.0
    e = {d: alpha * math.exp(-d / sigma) / sigma for d in (1, 4, 9)}
    expected = np.array(
        [
            [1 - e[1] - e[9], e[1], e[9]],
            [e[1], 1 - e[1] - e[4], e[4]],
            [e[9], e[4], 1 - e[9] - e[4]],
        ]
    )
    w = fedamp_weights(models, sigma=sigma, alpha_k=alpha)  # float32 Gram: ~1e-7 relative
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_fedamp_rescales_saturated_rows() -> None:
    models = np.ones((3, 5), dtype=np.float32)  # identical: xi_ij = alpha/sigma = 1 each
    w = fedamp_weights(models, sigma=1.0, alpha_k=1.0)
    np.testing.assert_allclose(w, [[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    np.testing.assert_allclose(fedamp_weights(models, sigma=1.0, alpha_k=0.0), np.eye(3))
    with pytest.raises(ValueError, match="sigma"):
        fedamp_weights(models, sigma=0.0, alpha_k=0.1)


def test_fedamp_far_models_are_local() -> None:
    models = np.array([[0.0, 0.0], [100.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(fedamp_weights(models, sigma=1.0, alpha_k=0.1), np.eye(2))


def test_oracle_block_structure() -> None:
    w = oracle_weights(np.array([0, 1, 0, 1, 2]), np.array([1, 2, 3, 4, 0]))
    np.testing.assert_allclose(
        w,
        [
            [0.25, 0, 0.75, 0, 0],
            [0, 2 / 6, 0, 4 / 6, 0],
            [0.25, 0, 0.75, 0, 0],
            [0, 2 / 6, 0, 4 / 6, 0],
            [0, 0, 0, 0, 1],
        ],
    )
    _assert_rows_sum_to_one(w)


def test_relative_threshold_and_max_peer_self_give_group_averages():
    """Two groups of 3 with small cosines (in-group 0.13, cross 0.03): the paper rule keeps
    ~80% on self; relative threshold 0 + max-peer self weighs the own group uniformly."""
    g = np.array([0, 0, 0, 1, 1, 1])
    s = np.where(g[:, None] == g[None, :], 0.13, 0.03)
    np.fill_diagonal(s, 1.0)
    paper = personalized_weights(s)
    assert paper[0, 0] > 0.7
    w = personalized_weights(s, threshold=0.0, relative_threshold=True, clip_negative=True,
                             self_similarity="max-peer")
    same = g[:, None] == g[None, :]
    np.testing.assert_allclose(w, np.where(same, 1 / 3, 0.0))


def test_self_similarity_validation_and_lone_client():
    with pytest.raises(ValueError, match="self_similarity"):
        personalized_weights(np.eye(2), self_similarity="zero")
    s = np.array([[1.0, -0.2], [-0.2, 1.0]])
    w = personalized_weights(s, clip_negative=True, self_similarity="max-peer")
    np.testing.assert_allclose(w, np.eye(2))
