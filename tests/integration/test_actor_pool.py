"""Warm client actors between runs (:func:`fedbip_ray.reuse_actors`, on for this test session):
a run of the same shape starts on the previous run's actors and gets the result fresh actors
give; a run of another shape, or one whose warm actor is gone, gets new ones; a pooled actor
that crashes comes back with the config of its latest reset, not of its first run."""

from __future__ import annotations

import os
import signal

import pytest

from fedbip_ray import api
from fedbip_ray.config import config_from_dict
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime import actor_pool
from fedbip_ray.runtime.cluster import probe_actor, spawn_client

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


def _pooled_pids(ray) -> set[int]:
    return {ray.get(a.info.remote(), timeout=60)["pid"] for a in actor_pool._pool.actors}


def test_runs_of_one_shape_share_actors_and_match_a_run_on_fresh_ones(ray_local, tmp_path):
    ray = ray_local
    assert actor_pool.enabled()
    actor_pool.release()  # the first run starts fresh actors
    fresh = api.run(tiny_config(), tmp_path / "fresh")
    pids = _pooled_pids(ray)
    assert len(pids) == 2
    other = api.run(tiny_config(strategy={"name": "fedavg"},
                                model={"peft": {"r": 2, "alpha": 4, "dropout": 0.0}}),
                    tmp_path / "fedavg")
    assert _pooled_pids(ray) == pids and other["strategy"] == "fedavg"
    again = api.run(tiny_config(), tmp_path / "again")
    assert _pooled_pids(ray) == pids
    assert again["per_client_accuracy"] == fresh["per_client_accuracy"]
    assert again["mean_val_accuracy"] == fresh["mean_val_accuracy"]

    ray.kill(actor_pool._pool.actors[0], no_restart=True)  # a warm actor gone for good
    healed = api.run(tiny_config(), tmp_path / "healed")
    assert healed["per_client_accuracy"] == fresh["per_client_accuracy"]
    fresh_pids = _pooled_pids(ray)
    assert len(fresh_pids) == 2 and not fresh_pids & pids  # both stopped, two new ones

    api.run(tiny_config(resources={"num_cpus_per_client": 1, "max_actors": 1}), tmp_path / "one")
    (new,) = _pooled_pids(ray)
    assert new not in fresh_pids  # another shape: the two warm actors were stopped, one started


def test_a_pooled_actor_restarted_after_a_crash_builds_its_latest_config(ray_local):
    ray = ray_local
    actor_pool.release()
    first, latest = (config_from_dict(tiny_config(model={"peft": {"r": r, "alpha": 2 * r}}))
                     for r in (2, 8))
    actor = spawn_client(first, 2)
    try:
        size_first = Layout.from_dict(ray.get(actor.info.remote(), timeout=120)["layout"]).size
        ray.get(actor.reset.remote(latest, 2), timeout=120)
        info = ray.get(actor.info.remote(), timeout=60)
        size_latest = Layout.from_dict(info["layout"]).size
        assert size_latest > size_first
        os.kill(info["pid"], signal.SIGKILL)  # the actor process this test started
        alive, after = probe_actor(actor, 120)
        assert alive and after is not None and after["pid"] != info["pid"]
        assert Layout.from_dict(after["layout"]).size == size_latest
    finally:
        ray.kill(actor)
