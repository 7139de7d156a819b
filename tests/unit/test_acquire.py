"""Sizing and fail-fast rules of runtime/acquire.py (pure parts; no Ray cluster)."""

from __future__ import annotations

import pytest
import yaml

from fedbip_ray.config import ConfigError
from fedbip_ray.runtime import acquire
from fedbip_ray.runtime.acquire import ClusterLimits, NodeType

from ..conftest import REPO

HEAD = NodeType("ray.head.default", {"CPU": 1.0}, 1, head=True)
GPU = NodeType("gpu_worker", {"CPU": 1.0, "GPU": 1.0}, 3)


def limits(types=(HEAD, GPU), max_workers=3, nodes=({"CPU": 1.0},), autoscaler=True):
    return ClusterLimits(autoscaler, types, max_workers, tuple(nodes), "test")


def test_bundle_shape_leaves_out_zero_resources():
    assert acquire.bundle_shape(1, 0) == {"CPU": 1.0}
    assert acquire.bundle_shape(0, 0) == {}
    assert acquire.format_bundle(acquire.bundle_shape(1, 0.25)) == "{CPU: 1, GPU: 0.25}"


def test_fits_per_node_counts_fractional_gpus():
    assert acquire.fits_per_node({"CPU": 1, "GPU": 0.25}, {"CPU": 8, "GPU": 1}) == 4
    assert acquire.fits_per_node({"CPU": 1, "GPU": 1}, {"CPU": 8}) == 0
    assert acquire.fits_per_node({"GPU": 0.1}, {"GPU": 0.3}) == 3  # no float round-down


def test_configured_capacity_respects_the_worker_cap_and_counts_the_head():
    cpu = {"CPU": 1.0}
    assert acquire.configured_capacity(cpu, (HEAD, GPU), 3) == 4
    assert acquire.configured_capacity(cpu, (HEAD, GPU), 2) == 3
    assert acquire.configured_capacity({"CPU": 1, "GPU": 1}, (HEAD, GPU), None) == 3
    unbounded = NodeType("gpu", {"GPU": 1.0}, -1)
    assert acquire.configured_capacity({"GPU": 1.0}, (HEAD, unbounded), None) is None


def test_ceiling_is_the_present_nodes_without_autoscaler_and_unknown_without_its_config():
    b = {"CPU": 1.0, "GPU": 1.0}
    assert acquire.ceiling_capacity(b, limits(autoscaler=False, nodes=({"CPU": 2, "GPU": 2},))) == 2
    assert acquire.ceiling_capacity(b, limits(types=None)) is None
    assert acquire.ceiling_capacity(b, limits()) == 3


def test_plan_takes_the_smallest_of_clients_max_actors_and_ceiling():
    b = {"CPU": 1.0, "GPU": 1.0}
    assert acquire.plan_num_actors(10, b, limits()) == 3
    assert acquire.plan_num_actors(10, b, limits(), max_actors=2) == 2
    assert acquire.plan_num_actors(2, b, limits()) == 2
    assert acquire.plan_num_actors(10, b, limits(types=None)) == 10
    assert acquire.plan_num_actors(10, b, limits(), requested=3) == 3
    assert acquire.plan_num_actors(10, {}, limits()) == 10


def test_plan_fails_at_once_in_one_line_for_what_can_never_come():
    with pytest.raises(ConfigError) as exc:
        acquire.plan_num_actors(4, {"CPU": 1.0, "GPU": 5.0}, limits())
    msg = str(exc.value)
    assert (msg.startswith("resources.num_gpus_per_client=5: no node can ever hold")
            and "\n" not in msg)
    assert "gpu_worker {CPU: 1, GPU: 1} x3" in msg
    with pytest.raises(ConfigError,
                       match=r"resources.num_actors=4: the cluster can hold at most 3"):
        acquire.plan_num_actors(4, {"CPU": 1.0, "GPU": 1.0}, limits(), requested=4)
    with pytest.raises(ConfigError, match=r"num_cpus_per_client=4"):
        acquire.plan_num_actors(4, {"CPU": 4.0}, limits(autoscaler=False))


def test_acquire_needs_no_group_for_an_empty_bundle_and_fails_fast_before_creating_one():
    assert acquire.acquire_bundles(3, 0, 0) is None
    with pytest.raises(ConfigError, match="GPU: 5"):
        acquire.acquire_bundles(2, 1, 5, limits=limits())
    with pytest.raises(ConfigError, match="at most 3 of 4 bundles"):
        acquire.acquire_bundles(4, 1, 1, limits=limits())


def test_launcher_configs_of_the_repo_give_their_gpu_ceilings():
    types, cap = acquire.launcher_node_types(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    cloud = ClusterLimits(True, types, cap, (), "cluster.yaml")
    assert acquire.ceiling_capacity({"CPU": 1.0, "GPU": 1.0}, cloud) == 8
    assert acquire.ceiling_capacity({"CPU": 1.0, "GPU": 0.25}, cloud) == 32
    types, cap = acquire.launcher_node_types(
        yaml.safe_load((REPO / "cluster.local.yaml").read_text()))
    local = ClusterLimits(True, types, cap, (), "cluster.local.yaml")
    assert acquire.ceiling_capacity({"CPU": 1.0, "GPU": 1.0}, local) == 3
    assert acquire.launcher_node_types(
        {"available_node_types": {"w": {"max_workers": 2}}}) == (None, None)


def test_a_monitor_mirroring_the_nodes_is_no_autoscaler():
    mirror = {"autoscaler_report": {"active_nodes": {"node_ab12": 1}, "pending_launches": {}}}
    scaling = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1},
                                     "pending_launches": {"gpu_worker": 2}}}
    assert acquire.is_readonly(mirror) and acquire.is_readonly({})
    assert not acquire.is_readonly(scaling)
    assert acquire.status_node_types(scaling) == {"ray.head.default", "gpu_worker"}
