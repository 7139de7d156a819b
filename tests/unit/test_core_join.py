"""core.join: a newcomer's aggregate from the stored clients' cumulative vectors (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.join import informed_rows, join_aggregate, personalizes_by_similarity
from fedbip_ray.core.strategies import make_strategy
from fedbip_ray.core.taskvector import Layout

LAYOUT = Layout.from_shapes({"head.weight": (2, 2)})
INIT = np.array([0.5, -0.25, 0.125, 1.0], dtype=np.float32)
E = np.eye(4, dtype=np.float32)
# group 0 (clients 0, 1) moved along e0, group 1 (clients 2, 3) along e1
CUMULATIVE = np.stack([2 * E[0], 4 * E[0], 3 * E[1], 1 * E[1]])
STATES = INIT + CUMULATIVE
COUNTS = np.array([10, 10, 10, 10])


def _join(name: str, tau: np.ndarray, params: dict | None = None, states: np.ndarray = STATES,
          **kw):
    strategy = make_strategy(name, params or {})
    return join_aggregate(strategy, states, INIT, tau[None, :], LAYOUT, COUNTS,
                          np.array([5]), **kw)[0]


@pytest.mark.parametrize("name", ["fedbip", "fedbip-paper", "fedbip-layer"])
def test_newcomer_like_group_0_takes_group_0(name):
    tau = 6 * E[0]
    res = _join(name, tau)
    # similarity row: 1 to both group-0 clients, 0 to group 1, self 1
    assert np.allclose(res.similarity[:4], [1, 1, 0, 0])
    # fedbip: relative threshold keeps the peers above the mean (0.5), self weighs like the best
    # peer (1); fedbip-paper: S / sum S with S = [1, 1, 0, 0, 1]: the same thirds
    assert np.allclose(res.weights, [1 / 3, 1 / 3, 0, 0, 1 / 3])
    assert res.weight_on(np.array([0, 1])) == pytest.approx(2 / 3)
    assert res.self_weight == pytest.approx(1 / 3)
    expected = INIT + (2 * E[0] + 4 * E[0] + 6 * E[0]) / 3
    assert np.allclose(res.state, expected)
    assert res.state.dtype == np.float32 and res.state.shape == (4,)


@pytest.mark.parametrize("tau", [5 * E[2], -(E[0] + E[1])], ids=["orthogonal", "opposed"])
@pytest.mark.parametrize("name", ["fedbip", "fedbip-paper"])
def test_newcomer_unlike_every_group_stays_local(name, tau):
    res = _join(name, tau)
    if name == "fedbip-paper" and tau[0] < 0:
        # the published rule keeps negative similarities: S = [s, s, s, s, 1], s = -1/sqrt(2),
        # so its normalizer 1 + 4s is negative and the weights flip sign
        s = -1 / np.sqrt(2)
        assert np.allclose(res.weights, np.array([s, s, s, s, 1]) / (1 + 4 * s))
        return
    assert res.self_weight == pytest.approx(1.0)
    assert np.allclose(res.weights[:4], 0)
    assert np.allclose(res.state, INIT + tau)  # = local training


def test_stored_states_are_not_changed():
    states = STATES.copy()
    _join("fedbip", 6 * E[0], states=states)
    assert np.array_equal(states, STATES)


def test_uninformed_stored_client_is_left_out():
    states = STATES.copy()
    states[1] = INIT  # never took part
    assert informed_rows(states, INIT).tolist() == [True, False, True, True]
    res = _join("fedbip", 6 * E[0], states=states)
    assert res.weights[1] == 0 and np.isnan(res.similarity[1])
    # peers 0, 2, 3 with S = [1, 0, 0]: mean 1/3, only client 0 kept; self weighs 1
    assert np.allclose(res.weights, [0.5, 0, 0, 0, 0.5])
    assert np.allclose(res.state, INIT + (2 * E[0] + 6 * E[0]) / 2)


def test_fedavg_and_local_use_their_own_rules():
    tau = 6 * E[0]
    avg = _join("fedavg", tau)
    assert np.allclose(avg.weights, np.array([10, 10, 10, 10, 5]) / 45)
    assert np.allclose(avg.state, INIT + (10 * CUMULATIVE.sum(0) + 5 * tau) / 45, atol=1e-6)
    local = _join("local", tau)
    assert local.self_weight == 1.0 and np.allclose(local.state, INIT + tau)
    assert local.similarity is None


def test_oracle_needs_and_uses_groups():
    tau = 6 * E[1]
    res = _join("oracle", tau, groups=(np.array([0, 0, 1, 1]), np.array([1])))
    assert res.weight_on(np.array([2, 3])) == pytest.approx(20 / 25)
    assert np.allclose(res.weights, np.array([0, 0, 10, 10, 5]) / 25)
    with pytest.raises(ValueError, match="groups"):
        _join("oracle", tau)


def test_newcomers_joined_together_see_each_other():
    strategy = make_strategy("fedbip", {})
    taus = np.stack([6 * E[0], 6 * E[0]])
    out = join_aggregate(strategy, STATES, INIT, taus, LAYOUT, COUNTS, np.array([5, 5]),
                         together=True)
    assert [r.index for r in out] == [0, 1]
    # peers of newcomer 0: S = [1, 1, 0, 0, 1]: mean 0.6, keeps 0, 1 and newcomer 1
    assert np.allclose(out[0].weights, [0.25, 0.25, 0, 0, 0.25, 0.25])
    assert np.allclose(out[1].weights, [0.25, 0.25, 0, 0, 0.25, 0.25])


def test_newcomers_join_on_their_own_by_default():
    strategy = make_strategy("fedbip", {})
    taus = np.stack([6 * E[0], 5 * E[2]])
    out = join_aggregate(strategy, STATES, INIT, taus, LAYOUT, COUNTS, np.array([5, 5]))
    assert [r.index for r in out] == [0, 0] and all(len(r.weights) == 5 for r in out)
    assert np.allclose(out[0].weights, [1 / 3, 1 / 3, 0, 0, 1 / 3])
    assert out[1].self_weight == pytest.approx(1.0)


def test_gradient_reference_compares_cumulative_vectors():
    res = _join("fedbip", 6 * E[0], {"reference": "gradient"})
    assert np.allclose(res.weights, [1 / 3, 1 / 3, 0, 0, 1 / 3])


def test_similarity_strategies_are_named():
    assert personalizes_by_similarity(make_strategy("fedbip", {}))
    assert not personalizes_by_similarity(make_strategy("fedavg", {}))
