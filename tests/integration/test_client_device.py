"""The client actor's device follows the GPUs Ray assigned it, not CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import pytest

from fedbip_ray.config import config_from_dict

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


def test_actor_without_gpus_trains_on_cpu_and_reports_its_node(ray_local):
    ray = ray_local
    from fedbip_ray.runtime.client import ClientActor

    cfg = config_from_dict(tiny_config())
    actor = ClientActor.options(
        num_cpus=0, num_gpus=0,
        runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}}).remote(cfg, 2)
    try:
        info = ray.get(actor.info.remote(), timeout=120)
        assert info["error"] is None and info["device"] == "cpu"
        assert info["node_id"] in {n["NodeID"] for n in ray.nodes()}
    finally:
        ray.kill(actor)
