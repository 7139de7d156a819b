"""Under client-level DP no raw local update reaches what the server stores, compares or
publishes: the validation gate's candidates, the states (checkpoints, adapters) and the
similarity all derive from the clipped and noised task vectors."""

from __future__ import annotations

import numpy as np

from fedbip_ray.core.strategies import GaussianNoiseStrategy, make_strategy
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import ClientUpdate, NoiseSettings, ServerSettings
from fedbip_ray.runtime.server import FederatedServer, noise_seed

LAYOUT = Layout.from_shapes({"lora_A.weight": (2, 4), "lora_B.weight": (4, 2), "head": (3,)})
N, CLIP, Z = 4, 1.0, 0.5


def _server(params: dict) -> FederatedServer:
    srv = FederatedServer(ServerSettings.of("fedbip", params, N, [0, 0, 1, 1],
                                            privacy=NoiseSettings(CLIP, Z), seed=7))
    srv.initialize(np.zeros(LAYOUT.size, dtype=np.float32), LAYOUT)
    return srv


def _raw(rnd: int) -> np.ndarray:
    return np.random.default_rng(rnd).standard_normal((N, LAYOUT.size)).astype(np.float32)


def _noised(srv: FederatedServer, rnd: int, taus: np.ndarray) -> np.ndarray:
    """What the server's DP step turns this round's task vectors into (same seed)."""
    from fedbip_ray.core.interface import AggregationInput

    noise = GaussianNoiseStrategy(make_strategy("local", {}), CLIP, Z, noise_seed(7, rnd))
    inp = AggregationInput(states=srv.all_states().copy(), deltas=taus,
                           counts=np.ones(N, dtype=np.int64), layout=LAYOUT)
    return noise.privatize(inp).deltas


def test_gate_candidates_and_stored_states_come_from_noised_updates_only():
    srv = _server({"gate": [1.0, 0.5, 0.0], "reference": "pretrained"})
    for rnd in (1, 2):
        start, taus = srv.all_states().copy(), _raw(rnd)
        noised = _noised(srv, rnd, taus)
        report = srv.aggregate(rnd, [ClientUpdate(c, rnd, taus[c], LAYOUT, 10) for c in range(N)])
        assert report.aggregated and report.modified == list(range(N))  # locals are sent
        for c in range(N):
            local = srv.gate_local(c)
            np.testing.assert_array_equal(local, start[c] + noised[c])
            assert not np.allclose(local, start[c] + taus[c])  # the raw update is not there
        srv.apply_gate({0: 0.0, 1: 0.5, 2: 1.0, 3: 0.0})
        states, _ = srv.state_dict()  # what checkpoints and MLflow adapters publish
        np.testing.assert_array_equal(states["states"][0], start[0] + noised[0])
        assert not np.allclose(states["states"][3], start[3] + taus[3])
    # the next round's similarity (cumulative vectors θ − θ_init) was computed from them
    assert np.isfinite(report.similarity).all()


def test_the_similarity_is_that_of_the_noised_vectors():
    srv = _server({"gate": [], "reference": "round", "lora_product": False, "center": False})
    taus = _raw(1)
    noised = _noised(srv, 1, taus)
    report = srv.aggregate(1, [ClientUpdate(c, 1, taus[c], LAYOUT, 10) for c in range(N)])
    unit = noised / np.linalg.norm(noised, axis=1, keepdims=True)
    np.testing.assert_allclose(report.similarity, unit @ unit.T, rtol=1e-5, atol=1e-6)
    raw_unit = taus / np.linalg.norm(taus, axis=1, keepdims=True)
    assert not np.allclose(report.similarity, raw_unit @ raw_unit.T, atol=1e-3)
