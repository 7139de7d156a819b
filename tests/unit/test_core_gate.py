"""Validation gate: candidate mixes, choice rule, option checks, strategy wiring."""

import math

import numpy as np
import pytest

from fedbip_ray.core import make_strategy
from fedbip_ray.core.gate import check_mixes, choose_mix, mix_candidates, pool_rounds


def test_mix_candidates_interpolates_between_local_and_aggregate():
    local = np.array([0.0, 2.0, -1.0], dtype=np.float32)
    agg = np.array([1.0, 0.0, 3.0], dtype=np.float32)
    c = mix_candidates(local, agg, [1.0, 0.5, 0.0])
    assert c.shape == (3, 3) and c.dtype == np.float32
    np.testing.assert_allclose(c[0], agg)
    np.testing.assert_allclose(c[1], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(c[2], local)


def test_mix_candidates_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal"):
        mix_candidates(np.zeros(3), np.zeros(4), [1.0])


def test_choose_mix_leaves_the_aggregate_only_when_clearly_worse():
    mixes = (1.0, 0.5, 0.0)
    # 100 validation examples: SE of 0.9 is 0.03; the aggregate at 0.85 is clearly worse
    assert choose_mix([{"accuracy": 0.85, "n": 100}, {"accuracy": 0.88, "n": 100},
                       {"accuracy": 0.9, "n": 100}], mixes) == 0.5
    assert choose_mix([{"accuracy": 0.80, "n": 100}, {"accuracy": 0.84, "n": 100},
                       {"accuracy": 0.9, "n": 100}], mixes) == 0.0
    # 20 examples: SE of 0.9 is 0.067, so 0.85 is not clearly worse and the aggregate stays
    assert choose_mix([{"accuracy": 0.85, "n": 20}, {"accuracy": 0.8, "n": 20},
                       {"accuracy": 0.9, "n": 20}], mixes) == 1.0
    # without n: plain argmax, ties to the larger mix whatever the order of the mixes
    assert choose_mix([{"accuracy": 0.6}, {"accuracy": 0.7}, {"accuracy": 0.65}], mixes) == 0.5
    tie = {"accuracy": 0.7}
    assert choose_mix([tie, tie, tie], mixes) == 1.0
    assert choose_mix([tie, tie, tie], (0.0, 1.0, 0.5)) == 1.0
    # a perfect score has no noise: only equally perfect candidates are eligible
    assert choose_mix([{"accuracy": 0.95, "n": 20}, {"accuracy": 1.0, "n": 20}], (1.0, 0.0)) == 0.0


def test_choose_mix_nan_scores_never_win_and_all_nan_keeps_aggregate():
    nan = {"accuracy": math.nan, "loss": math.nan, "n": 0}
    assert choose_mix([nan, {"accuracy": 0.1, "n": 5}], (1.0, 0.0)) == 0.0
    assert choose_mix([nan, nan], (1.0, 0.0)) == 1.0
    with pytest.raises(ValueError, match="scores"):
        choose_mix([nan], (1.0, 0.0))


@pytest.mark.parametrize("bad", [[1.5], [-0.1], [0.5, 0.5], ["a"], "1.0", [True], [math.nan]])
def test_check_mixes_rejects_bad_entries(bad):
    with pytest.raises(ValueError, match="gate"):
        check_mixes(bad)


def test_check_mixes_sorts_and_empty_turns_off():
    assert check_mixes([0.0, 1.0, 0.5]) == (1.0, 0.5, 0.0)
    assert check_mixes([]) == () and check_mixes(None) == ()


def test_pool_rounds_weighs_older_rounds_by_memory():
    r1 = [{"accuracy": 0.5, "n": 20}, {"accuracy": 1.0, "n": 20}]
    r2 = [{"accuracy": 1.0, "n": 30}, {"accuracy": 0.5, "n": 30}]
    assert pool_rounds([r1, r2], 0.0) == r2  # this round only
    same = pool_rounds([r1, r2], 1.0)
    assert same[0] == pytest.approx({"accuracy": (10 + 30) / 50, "n": 50})
    assert same[1] == pytest.approx({"accuracy": (20 + 15) / 50, "n": 50})
    half = pool_rounds([r1, r2], 0.5)  # round 1 counts as 10 examples
    assert half[0] == pytest.approx({"accuracy": (5 + 30) / 40, "n": 40})
    nan = [{"accuracy": math.nan, "n": 0}, {"accuracy": 0.25, "n": 8}]
    assert pool_rounds([nan, r2], 1.0)[0] == pytest.approx({"accuracy": 1.0, "n": 30})
    with pytest.raises(ValueError, match="same"):
        pool_rounds([r1, r2[:1]], 1.0)
    with pytest.raises(ValueError, match="one round"):
        pool_rounds([], 1.0)


def test_pooled_evidence_leaves_an_aggregate_one_round_could_not_reject():
    """Each round the aggregate is 1 of 25 examples behind its own model: within one standard
    error alone, clearly behind over four rounds."""
    mixes = (1.0, 0.0)
    one = [{"accuracy": 0.88, "n": 25}, {"accuracy": 0.92, "n": 25}]
    assert choose_mix(pool_rounds([one], 1.0), mixes) == 1.0
    assert choose_mix(pool_rounds([one] * 4, 1.0), mixes) == 0.0
    assert choose_mix(pool_rounds([one] * 4, 0.0), mixes) == 1.0


def test_loss_breaks_exact_accuracy_ties_only():
    mixes = (1.0, 0.5, 0.0)
    stuck = [{"accuracy": 0.5, "n": 30, "loss": x} for x in (0.80, 0.72, 0.65)]
    assert choose_mix(stuck, mixes) == 1.0  # ties keep the aggregate
    assert choose_mix(stuck, mixes, ties="loss") == 0.0  # its own model fits its data better
    # within one standard error but not tied: accuracy still decides, towards the aggregate
    close = [{"accuracy": 0.8, "n": 30, "loss": 0.9}, {"accuracy": 0.83, "n": 30, "loss": 0.2}]
    assert choose_mix(close, (1.0, 0.0), ties="loss") == 1.0
    # NaN losses never win; none finite: the usual rule
    nan = [{"accuracy": 0.5, "n": 30, "loss": math.nan}, {"accuracy": 0.5, "n": 30, "loss": 0.7}]
    assert choose_mix(nan, (1.0, 0.0), ties="loss") == 0.0
    assert choose_mix([{"accuracy": 0.5, "n": 30}] * 2, (1.0, 0.0), ties="loss") == 1.0
    with pytest.raises(ValueError, match="gate_ties"):
        choose_mix(stuck, mixes, ties="random")
    with pytest.raises(ValueError, match="gate_ties"):
        make_strategy("fedbip", {"gate_ties": "random"})
    assert make_strategy("fedbip", {"gate_ties": "loss"}).client_options.gate_ties == "loss"
    pooled = pool_rounds([stuck, stuck[::-1]], 1.0)
    assert [p["loss"] for p in pooled] == pytest.approx([0.725, 0.72, 0.725])


def test_loss_se_leaves_the_aggregate_only_when_the_loss_is_clearly_lower():
    """Exact accuracy ties: the largest λ whose loss is within one standard error
    (loss_sd / sqrt(n)) of the lowest loss wins."""
    mixes = (1.0, 0.5, 0.0)

    def tied(losses, sd):
        return [{"accuracy": 0.5, "n": 25, "loss": x, "loss_sd": sd} for x in losses]
    # se = 0.5 / 5 = 0.1: a gap of 0.3 is clear, the 0.5 mix (0.05 above the lowest) is not
    assert choose_mix(tied((0.95, 0.70, 0.65), 0.5), mixes, ties="loss-se") == 0.5
    assert choose_mix(tied((0.95, 0.80, 0.65), 0.5), mixes, ties="loss-se") == 0.0
    # a gap of 0.02 against se 0.1 is noise: the aggregate stays ("loss" would leave it)
    small = tied((0.67, 0.66, 0.65), 0.5)
    assert choose_mix(small, mixes, ties="loss-se") == 1.0
    assert choose_mix(small, mixes, ties="loss") == 0.0
    # without a spread the noise is unknown: the aggregate stays
    bare = [{"accuracy": 0.5, "n": 25, "loss": x} for x in (0.95, 0.80, 0.65)]
    assert choose_mix(bare, mixes, ties="loss-se") == 1.0
    assert choose_mix(bare, mixes, ties="loss") == 0.0
    # not tied on accuracy: the accuracy rule decides, whatever the losses
    close = [{"accuracy": 0.8, "n": 30, "loss": 0.9, "loss_sd": 0.01},
             {"accuracy": 0.83, "n": 30, "loss": 0.2, "loss_sd": 0.01}]
    assert choose_mix(close, (1.0, 0.0), ties="loss-se") == 1.0
    assert make_strategy("fedbip", {"gate_ties": "loss-se"}).client_options.gate_ties == "loss-se"


def test_pool_rounds_pools_the_loss_spread_from_second_moments():
    a = [{"accuracy": 0.5, "n": 10, "loss": 1.0, "loss_sd": 0.0}]
    b = [{"accuracy": 0.5, "n": 10, "loss": 3.0, "loss_sd": 0.0}]
    pooled = pool_rounds([a, b], 1.0)[0]  # 10 losses of 1 and 10 of 3: mean 2, sd 1
    assert pooled["loss"] == pytest.approx(2.0) and pooled["loss_sd"] == pytest.approx(1.0)
    # a round without a spread leaves the pooled spread unknown
    assert "loss_sd" not in pool_rounds([a, [{"accuracy": 0.5, "n": 10, "loss": 3.0}]], 1.0)[0]


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, True, "1"])
def test_gate_memory_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="gate_memory"):
        make_strategy("fedbip", {"gate_memory": bad})


def test_fedbip_strategies_expose_the_gate_to_clients():
    assert make_strategy("fedbip", {"gate_memory": 1}).client_options.gate_memory == 1.0
    assert make_strategy("fedbip").client_options.gate_memory == 0.0
    assert make_strategy("fedbip").client_options.gate_ties == "loss-se"
    assert make_strategy("fedbip", {"gate_ties": "aggregate"}).client_options.gate_ties == \
        "aggregate"
    assert make_strategy("fedbip").client_options.gate_mixes == (1.0, 0.5, 0.0)
    assert make_strategy("fedbip-layer",
                         {"gate": [0.0, 1.0]}).client_options.gate_mixes == (1.0, 0.0)
    assert make_strategy("fedbip", {"gate": []}).client_options.gate_mixes == ()
    assert make_strategy("fedbip-paper").client_options.gate_mixes == ()
    assert make_strategy("fedavg").client_options.gate_mixes == ()
    with pytest.raises(ValueError, match="gate"):
        make_strategy("fedbip", {"gate": [2.0]})


def test_server_gate_pair_and_apply_gate():
    from fedbip_ray.core.taskvector import Layout
    from fedbip_ray.runtime.messages import ClientUpdate, ServerSettings
    from fedbip_ray.runtime.server import FederatedServer

    layout = Layout.from_shapes({"a.weight": (2, 3), "head.weight": (2,)})
    rng = np.random.default_rng(0)
    srv = FederatedServer(ServerSettings.of("fedbip", {"reference": "round",
                                                       "lora_product": False}, 3))
    init = rng.normal(size=layout.size).astype(np.float32)
    srv.initialize(init, layout)
    taus = rng.normal(size=(3, layout.size)).astype(np.float32)
    report = srv.aggregate(1, [ClientUpdate(c, 1, taus[c], layout, 10) for c in range(3)])
    assert report.aggregated
    agg = srv.all_states().copy()
    assert report.modified == []
    # own training only, bit for bit
    np.testing.assert_array_equal(srv.gate_local(1), init + taus[1])
    np.testing.assert_array_equal(srv.get_state(1), agg[1])  # the aggregate until the gate applies
    applied = srv.apply_gate({0: 1.0, 1: 0.0, 2: 0.5})
    assert applied == {1: 0.0, 2: 0.5}
    states = srv.all_states()
    np.testing.assert_allclose(states[0], agg[0])
    np.testing.assert_allclose(states[1], init + taus[1], rtol=1e-6)
    np.testing.assert_allclose(states[2], 0.5 * (init + taus[2]) + 0.5 * agg[2],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="no gate candidates"):
        srv.gate_local(1)  # consumed
    # strategies without a gate keep no copies
    plain = FederatedServer(ServerSettings.of("fedavg", {}, 3))
    plain.initialize(init, layout)
    plain.aggregate(1, [ClientUpdate(c, 1, taus[c], layout, 10) for c in range(3)])
    with pytest.raises(KeyError):
        plain.gate_local(0)
    assert plain.last_round() is None  # nor the round's task vectors, unless asked
    plain.keep_last_round(True)
    plain.aggregate(2, [ClientUpdate(c, 2, taus[c], layout, 10) for c in (0, 2)])
    last = plain.last_round()
    assert last["round"] == 2 and last["clients"] == [0, 2]
    np.testing.assert_array_equal(last["deltas"], taus[[0, 2]])
    plain.keep_last_round(False)
    assert plain.last_round() is None


def test_all_finite_matches_numpy_in_row_blocks():
    from fedbip_ray.runtime.server import all_finite

    x = np.ones((130, 5), dtype=np.float32)
    assert all_finite(x) and all_finite(x[:0])
    for row in (0, 63, 64, 129):
        y = x.copy()
        y[row, 3] = np.inf if row % 2 else np.nan
        assert not all_finite(y)
