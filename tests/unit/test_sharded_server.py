"""A server split in K column blocks (federation.server_shards) gives the states of one block
for every strategy (FedBip and its options, FedBip-L, exact LoRA, FedAMP, the FedAvg family,
the oracle, FedSA-LoRA, FedAWA), with DP noise, norm bounds, the validation gate and late
joiners, up to float32 rounding: the BLAS kernels' summation order depends on where a block
starts in memory; the weights agree to float64 rounding. A checkpoint of K blocks resumes under
any K."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.blocks import split_layout
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import ClientUpdate, NoiseSettings, ServerSettings
from fedbip_ray.runtime.server import FederatedServer

LAYOUT = Layout.from_shapes({
    "l0.q.lora_A.default.weight": (2, 6), "l0.q.lora_B.default.weight": (6, 2),
    "l0.v.lora_A.default.weight": (2, 6), "l0.v.lora_B.default.weight": (5, 2),
    "l1.q.lora_A.default.weight": (2, 6), "l1.q.lora_B.default.weight": (6, 2),
    "classifier.modules_to_save.default.weight": (3, 6),
    "classifier.modules_to_save.default.bias": (3,),
})
N = 6
GROUPS = [0, 1, 0, 1, 0, 1]


def _init() -> np.ndarray:
    rng = np.random.default_rng(99)
    init = np.zeros(LAYOUT.size, dtype=np.float32)
    for name in LAYOUT.names:
        if "lora_A" in name:
            sl = LAYOUT.index(name)
            init[sl] = rng.standard_normal(sl.stop - sl.start).astype(np.float32)
    return init


def _server(strategy: str, params: dict, shards: int, **kw) -> FederatedServer:
    srv = FederatedServer(ServerSettings.of(strategy, params, N, GROUPS, seed=5, **kw), shards)
    srv.initialize(_init(), LAYOUT)
    return srv


def _updates(rnd: int, clients: list[int]) -> list[ClientUpdate]:
    rng = np.random.default_rng(rnd)
    base = rng.standard_normal((2, LAYOUT.size)).astype(np.float32)
    return [ClientUpdate(c, rnd, (base[GROUPS[c]] + 0.3 * rng.standard_normal(LAYOUT.size))
                         .astype(np.float32) * 0.1, LAYOUT, 10 + c,
                         {"train_loss": 1.0})
            for c in clients]


def close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 rounding of sums of a few terms."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _run(srv: FederatedServer, rounds: list[list[int]], gate: bool = False) -> list:
    reports = []
    for rnd, clients in enumerate(rounds, start=1):
        rep = srv.aggregate(rnd, _updates(rnd, clients))
        if gate and rep.aggregated:
            srv.apply_gate({c: (0.5 if c % 2 else 0.0) for c in rep.accepted})
        reports.append(rep)
    return reports


CASES = [
    ("fedbip", {}),
    ("fedbip", {"lora_exact": True, "reference": "round", "center": True}),
    ("fedbip", {"scope": "layer", "smoothing": 0.5}),
    ("fedbip", {"scope": "modules", "modules": ["classifier"]}),
    ("fedbip-layer", {"lora_exact": True}),
    ("fedbip-paper", {}),
    ("fedamp", {}),
    ("fedavg", {}),
    ("oracle", {}),
    ("local", {}),
    ("fedsa-lora", {}),
]


def test_blocks_split_at_module_boundaries():
    blocks = split_layout(LAYOUT, 3)
    assert blocks[0].start == 0 and blocks[-1].stop == LAYOUT.size
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:], strict=False))
    keys = [{n.split(".lora_")[0].split(".modules_to_save")[0] for n in b.layout.names}
            for b in blocks]
    assert not set.intersection(*keys)  # no module in two blocks
    with pytest.raises(ValueError, match="at most one shard per module"):
        split_layout(LAYOUT, 9)


@pytest.mark.parametrize(("strategy", "params"), CASES,
                         ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
@pytest.mark.parametrize("shards", [2, 4])
def test_k_blocks_give_the_states_of_one(strategy, params, shards):
    rounds = [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [1, 2, 4, 5]]  # 4 and 5 join late in round 2
    one, many = _server(strategy, params, 1), _server(strategy, params, shards)
    ref, got = _run(one, rounds, gate=True), _run(many, rounds, gate=True)
    assert len(many.blocks) == shards
    close(many.states, one.states)
    for a, b in zip(ref, got, strict=True):
        assert (a.accepted, a.aggregated) == (b.accepted, b.aggregated)
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(many.similarity, one.similarity, rtol=1e-9, atol=1e-12)
    assert not np.array_equal(one.states[4], _init())  # the late joiners did aggregate


def test_dp_noise_norm_bounds_and_rejections_are_the_same_under_k_blocks():
    kw = {"privacy": NoiseSettings(0.5, 0.8), "max_norm": 1.0, "on_excess_norm": "clip"}
    one, many = _server("fedbip", {}, 1, **kw), _server("fedbip", {}, 3, **kw)
    for srv in (one, many):
        ups = _updates(1, [0, 1, 2, 3])
        ups[2] = ClientUpdate(2, 1, np.full(LAYOUT.size, np.nan, np.float32), LAYOUT, 5)
        rep = srv.aggregate(1, ups)
        assert rep.rejected.keys() == {2} and "non-finite" in rep.rejected[2]
        assert rep.modified == [0, 1, 3]  # noised: every accepted local is sent to the gate
    close(many.states, one.states)
    close(many.gate_local(1), one.gate_local(1))


def test_fedawa_under_k_blocks():
    one, many = _server("fedawa", {"server_epochs": 5}, 1), _server("fedawa",
                                                                    {"server_epochs": 5}, 3)
    rounds = [[0, 1, 2], [0, 1, 2, 3, 4]]
    _run(one, rounds), _run(many, rounds)
    close(many.states, one.states)
    np.testing.assert_allclose(many.memory, one.memory, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize(("saved", "loaded"), [(3, 3), (3, 1), (1, 2)])
def test_a_checkpoint_resumes_under_any_number_of_blocks(saved, loaded):
    full = _server("fedbip", {}, 1)
    _run(full, [[0, 1, 2, 3], [2, 3, 4, 5], [0, 5]])
    first = _server("fedbip", {}, saved)
    _run(first, [[0, 1, 2, 3], [2, 3, 4, 5]])
    tensors, lay = first.state_dict()
    resumed = FederatedServer(ServerSettings.of("fedbip", {}, N, GROUPS, seed=5), loaded)
    resumed.load_state_dict({k: np.array(v) for k, v in tensors.items()}, lay)
    resumed.aggregate(3, _updates(3, [0, 5]))
    close(resumed.states, full.states)
