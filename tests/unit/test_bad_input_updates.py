"""Bad client updates at the server (no Ray): validation, min-report skipping, norm clipping,
DP noise (seeded per round), poison modes and failure reasons."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.faults import parse_poison, poison_vector
from fedbip_ray.runtime.messages import ClientUpdate, NoiseSettings, ServerSettings
from fedbip_ray.runtime.server import FederatedServer, failure_reason, noise_seed

LAYOUT = Layout.from_shapes({"a": (3,), "b": (2, 2)})
D = LAYOUT.size


def _server(strategy: str = "local", n: int = 4, **kw) -> FederatedServer:
    if isinstance(kw.get("privacy"), dict):
        kw["privacy"] = NoiseSettings(**kw["privacy"])
    srv = FederatedServer(ServerSettings.of(strategy, {}, n, [0, 1] * (n // 2), **kw))
    srv.initialize(np.zeros(D, dtype=np.float32), LAYOUT)
    return srv


def _update(cid: int, vec, rnd: int = 1, layout: Layout = LAYOUT) -> ClientUpdate:
    return ClientUpdate(cid, rnd, np.asarray(vec, dtype=np.float32), layout, 10)


def _vec(seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(D) * scale).astype(np.float32)


def test_each_kind_of_bad_update_is_rejected_with_a_reason():
    srv = _server(n=6, max_norm=10.0)
    other = Layout.from_shapes({"a": (3,), "c": (2, 2)})
    nan = _vec(2)
    nan[1] = np.inf
    report = srv.aggregate(1, [
        _update(0, _vec(1)),
        _update(1, nan),
        _update(2, _vec(3, 100.0)),
        _update(3, _vec(4), layout=other),
        _update(0, _vec(5)),              # duplicate
        _update(4, _vec(6), rnd=7),       # wrong round
        _update(9, _vec(7)),              # unknown client
    ])
    assert report.accepted == [0] and report.aggregated is True
    rej = report.rejected
    assert "non-finite" in rej[1] and "exceeds the bound 10" in rej[2]
    assert "layout mismatch" in rej[3] and "duplicate" in rej[0]
    assert "round 7" in rej[4] and "unknown client" in rej[9]
    assert np.array_equal(srv.states[1:], np.zeros((5, D), dtype=np.float32))


def test_fewer_valid_updates_than_needed_skip_aggregation():
    srv = _server()
    report = srv.aggregate(1, [_update(0, _vec(1)), _update(1, _vec(2) * np.nan)], min_accepted=2)
    assert report.accepted == [0] and report.aggregated is False
    assert np.array_equal(srv.states, np.zeros((4, D), dtype=np.float32))  # nothing moved
    report = srv.aggregate(2, [_update(0, _vec(1), 2), _update(1, _vec(2), 2)], min_accepted=2)
    assert report.aggregated is True


def test_excess_norm_is_clipped_when_configured():
    srv = _server(max_norm=2.0, on_excess_norm="clip")
    big = _vec(1, 1e6)
    report = srv.aggregate(1, [_update(0, big), _update(1, _vec(2, 0.1))])
    assert report.accepted == [0, 1] and report.rejected == {}
    assert report.modified == [0]  # the gate must send client 0 the server's own state
    assert np.linalg.norm(srv.states[0]) == pytest.approx(2.0, rel=1e-5)  # `local`: own vector
    assert np.allclose(srv.states[0], big / np.linalg.norm(big) * 2.0, atol=1e-6)


def test_dp_noise_is_a_function_of_seed_and_round():
    kw = {"privacy": {"clip_norm": 1.0, "noise_multiplier": 0.5}, "seed": 3}
    ups = [_update(c, _vec(c, 5.0)) for c in range(4)]
    a, b = _server(**kw), _server(**kw)
    a.aggregate(1, ups)
    b.aggregate(1, ups)
    assert np.array_equal(a.states, b.states)  # same (seed, round): same noise (resume-safe)
    c = _server(**kw)
    c.aggregate(2, [_update(u.client_id, u.vector, 2) for u in ups])
    assert not np.array_equal(a.states, c.states)
    # clipped to 1 then noise of std 0.5: far from the raw x5 vectors, noise std close to 0.5
    clipped = np.stack([u.vector / np.linalg.norm(u.vector) for u in ups])
    assert np.std(a.states - clipped) == pytest.approx(0.5, rel=0.5)
    assert noise_seed(3, 1) != noise_seed(3, 2) and noise_seed(3, 1) == noise_seed(3, 1)


def test_without_a_bound_a_scaled_update_reaches_its_peers_and_with_one_it_does_not():
    honest = [_update(c, _vec(c)) for c in (0, 2, 3)]
    ups = [*honest, _update(1, _vec(0) * 1e6)]  # client 1 poisons, aligned with client 0
    open_, guarded = _server("fedbip"), _server("fedbip", max_norm=50.0)
    open_.aggregate(1, ups)
    guarded.aggregate(1, ups)
    assert np.linalg.norm(open_.states[0]) > 1e4  # the peer's state is wrecked
    assert np.linalg.norm(guarded.states[0]) < 50 and 1 in guarded.aggregate(
        2, [_update(1, _vec(0) * 1e6, 2)]).rejected


def test_non_finite_aggregation_result_raises_instead_of_storing():
    srv = FederatedServer(ServerSettings.of("local", {}, 2))
    huge = np.full(D, 3e38, dtype=np.float32)
    srv.initialize(huge, LAYOUT)
    with pytest.raises(FloatingPointError), np.errstate(over="ignore"):
        srv.aggregate(1, [_update(0, huge), _update(1, huge)])  # state + delta overflows
    assert np.isfinite(srv.states).all()


def test_poison_spec_and_modes():
    assert parse_poison("1:scale, 3:nan") == {1: "scale", 3: "nan"}
    assert parse_poison(None) == {} and parse_poison("") == {}
    with pytest.raises(ValueError, match="bad entry"):
        parse_poison("x:scale")
    with pytest.raises(ValueError, match="bad entry"):
        parse_poison("1:explode")
    v = _vec(1)
    assert np.allclose(poison_vector(v, "scale"), v * 1e6)
    assert np.isnan(poison_vector(v, "nan")[0]) and not np.isnan(v[0])
    assert poison_vector(v, "layout").shape == (D - 1,)
    with pytest.raises(RuntimeError, match="injected"):
        poison_vector(v, "raise")


def test_failure_reason_is_one_line_naming_the_type():
    class TaskError(Exception):
        cause = RuntimeError("boom\nsecond line")

    assert failure_reason(TaskError("wrapper")) == "RuntimeError: boom"
    assert failure_reason(ValueError("")) == "ValueError: "


def test_gradient_signals_are_required_and_validated_when_compared():
    srv = FederatedServer(ServerSettings.of("fedbip", {"reference": "gradient", "gate": []}, 3))
    srv.initialize(np.zeros(D, dtype=np.float32), LAYOUT)
    bad_nan = _vec(9)
    bad_nan[1] = np.nan
    ups = [ClientUpdate(0, 1, _vec(0), LAYOUT, 10, {}, _vec(10)),
           ClientUpdate(1, 1, _vec(1), LAYOUT, 10, {}, None),
           ClientUpdate(2, 1, _vec(2), LAYOUT, 10, {}, bad_nan)]
    report = srv.aggregate(1, ups)
    assert report.accepted == [0]
    assert "no gradient signal" in report.rejected[1]
    assert report.rejected[2].startswith("gradient signal:") and "NaN" in report.rejected[2]
    assert report.bytes_in == 5 * D * 4  # three task vectors and two signals arrived


def test_the_actor_imports_fault_injection_under_the_same_variable():
    from fedbip_ray.runtime import client, faults

    assert client.FAULTS_ENV == faults.POISON_ENV == "FEDBIP_TEST_POISON"
