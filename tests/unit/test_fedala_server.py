"""The server's side of FedALA without Ray: results set the states on every column block and
the weights go to the per-client memory; a malformed result keeps the aggregate."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import ALAResult, ClientUpdate, ServerSettings
from fedbip_ray.runtime.server import FederatedServer

LAYOUT = Layout.from_shapes({"a.lora_A.default.weight": (3,), "b.lora_B.default.weight": (2,),
                             "classifier.modules_to_save.default.weight": (2,)})


@pytest.mark.parametrize("shards", [1, 2])
def test_apply_ala_sets_states_and_keeps_weights(shards) -> None:
    server = FederatedServer(ServerSettings.of("fedala", {"layer_idx": 1}, 3), shards=shards)
    server.initialize(np.zeros(LAYOUT.size, np.float32), LAYOUT)
    ups = [ClientUpdate(c, 1, np.full(LAYOUT.size, float(c + 1), np.float32), LAYOUT, 1)
           for c in range(3)]
    assert server.aggregate(1, ups).aggregated
    assert np.allclose(server.get_state(0), 2.0)  # FedAvg of 1, 2, 3
    assert np.allclose(server.gate_local(1), 2.0) and np.allclose(server.gate_local(2), 3.0)
    assert server.ala_weights(0) is None
    new = np.arange(LAYOUT.size, dtype=np.float32)
    results = [ALAResult(0, 1, new, np.array([0.5, 0.25], np.float32), 3, 0.1),
               ALAResult(1, 1, new.astype(np.float64), None, 1, 0.1)]  # wrong dtype: kept
    assert server.apply_ala(1, [0, 1], results) == [0]
    assert np.array_equal(server.get_state(0), new)
    assert np.allclose(server.get_state(1), 2.0)
    assert np.allclose(server.ala_weights(0), [0.5, 0.25]) and server.ala_weights(1) is None
    assert server.state_dict()[0]["memory"].shape == (3, 2)
