"""The validation gate's messages on real actors: the client actor keeps its trained state from
``fit``, so the server sends only the aggregate; a client whose actor lost that state (a
restart) is sent it and still gated."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.data.shards import build_shards
from fedbip_ray.runtime import actor_pool
from fedbip_ray.runtime.client import ClientActor
from fedbip_ray.runtime.context import RunContext
from fedbip_ray.runtime.messages import ServerSettings, ShardRef
from fedbip_ray.runtime.phases import gate_phase
from fedbip_ray.runtime.server import ServerActor

from ..conftest import tiny_config

pytestmark = pytest.mark.ray
MIXES = (1.0, 0.5, 0.0)


@pytest.fixture(scope="module")
def fitted(ray_local, tmp_path_factory):
    """One client actor after ``fit(keep=True)`` of clients 0 and 1 in round 1."""
    ray = ray_local
    cfg = config_from_dict(tiny_config(data={"num_clients": 2}))
    shards = build_shards(cfg.data, cfg.seed, tmp_path_factory.mktemp("gate") / "shards")
    refs = {c: ShardRef(c, ray.put(p.read_bytes())) for c, p in enumerate(shards.paths)}
    actor_pool.release()  # warm actors of earlier tests' runs would hold the CPUs
    actor = ClientActor.options(num_cpus=1).remote(cfg, shards.num_labels)
    init = ray.get(actor.initial_state.remote())
    updates = [actor.fit.remote(c, init, 1, 0.0, refs[c], False, True) for c in (0, 1)]
    yield cfg, shards, refs, actor, init, updates
    ray.kill(actor)


def test_actor_scores_with_the_state_kept_by_fit(ray_local, fitted):
    ray = ray_local
    _, _, refs, actor, init, updates = fitted
    local = init + ray.get(updates[0]).vector
    aggregate = init  # any other state
    kept = ray.get(actor.score_mixes.remote(0, aggregate, MIXES, 1, refs[0]))
    sent = ray.get(actor.score_mixes.remote(0, aggregate, MIXES, 1, refs[0], local))
    untrained = ray.get(actor.score_mixes.remote(0, aggregate, MIXES, 1, refs[0], init))
    assert kept == sent  # the kept state is the trained one, bit for bit
    assert [s["loss"] for s in kept] != [s["loss"] for s in untrained]
    assert ray.get(actor.score_mixes.remote(0, aggregate, MIXES, 1, refs[0])) is None  # used up
    assert ray.get(actor.score_mixes.remote(1, aggregate, MIXES, 2, refs[1])) is None  # other round


def test_gate_phase_sends_the_trained_state_only_to_clients_whose_actor_lost_it(ray_local, fitted):
    ray = ray_local
    cfg, shards, refs, _, init, _ = fitted
    # a fresh actor stands for a restarted one: it holds no trained states
    fresh = ClientActor.options(num_cpus=1).remote(cfg, shards.num_labels)
    server = ServerActor.options(num_cpus=0).remote(ServerSettings.of("fedbip", {}, 2))
    try:
        layout = Layout.from_dict(ray.get(fresh.info.remote())["layout"])
        ray.get(server.initialize.remote(init, layout))
        ups = [fresh.fit.remote(c, init, 1, 0.0, refs[c], False, c == 0) for c in (0, 1)]
        report = ray.get(server.aggregate_refs.remote(1, [0, 1], ups))
        assert report.aggregated and report.modified == []
        ctx = RunContext(cfg, shards.directory, shards, server=server, actors=[fresh],
                         shard_refs=refs)
        before = ray.get(server.all_states.remote()).copy()
        outcome = gate_phase(ctx, 1, [0, 1], MIXES, 120.0)
        chosen = outcome.chosen
        assert sorted(chosen) == [0, 1] and set(chosen.values()) <= set(MIXES)
        assert sorted(outcome.scores) == [0, 1]
        assert all(len(s) == 3 for s in outcome.scores.values())
        assert outcome.locals_sent == 1  # client 1's fit did not keep its state
        after = ray.get(server.all_states.remote())
        for c, lam in chosen.items():
            local = init + ray.get(ups[c]).vector
            np.testing.assert_allclose(after[c], local + lam * (before[c] - local),
                                       rtol=1e-5, atol=1e-6)
    finally:
        ray.kill(fresh)
        ray.kill(server)
