"""A strategy's per-client memory (FedAWA's logits) is kept by the server between rounds, for
the clients that took part, and travels with the checkpoint."""

from __future__ import annotations

import numpy as np

from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import ClientUpdate, ServerSettings
from fedbip_ray.runtime.server import FederatedServer

LAYOUT = Layout.from_shapes({"w": (6,)})


def _server() -> FederatedServer:
    srv = FederatedServer(ServerSettings.of("fedawa", {"server_epochs": 5}, 3))
    srv.initialize(np.zeros(LAYOUT.size, dtype=np.float32), LAYOUT)
    return srv


def _round(srv: FederatedServer, rnd: int, clients=(0, 1, 2)) -> None:
    rng = np.random.default_rng(rnd)
    ups = [ClientUpdate(c, rnd, rng.standard_normal(LAYOUT.size).astype(np.float32), LAYOUT,
                        10 + 5 * c) for c in clients]
    assert srv.aggregate(rnd, ups).aggregated


def test_the_logits_carry_over_rounds_and_checkpoints():
    srv = _server()
    _round(srv, 1, (0, 1))
    assert srv.memory is not None and srv.memory.shape == (3, 1)
    assert np.isfinite(srv.memory[[0, 1], 0]).all() and np.isnan(srv.memory[2, 0])
    tensors, layout = srv.state_dict()
    restored = _server()
    restored.load_state_dict({k: np.array(v) for k, v in tensors.items()}, layout)
    forgetful = _server()  # the same state without the memory: round 2 starts from the shares
    forgetful.load_state_dict({k: np.array(v) for k, v in tensors.items() if k != "memory"},
                              layout)
    for s in (srv, restored, forgetful):
        _round(s, 2)
    np.testing.assert_array_equal(restored.all_states(), srv.all_states())
    assert not np.allclose(forgetful.all_states(), srv.all_states())
