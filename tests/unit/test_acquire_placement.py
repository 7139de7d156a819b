"""Sizing on the embedded local Ray and the placement record of runtime/cluster.py (no Ray)."""

from __future__ import annotations

import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.runtime import acquire
from fedbip_ray.runtime.cluster import Placement, describe_where, plan_actors
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.runtime.rows import round_row

from ..conftest import tiny_config


def cfg(**resources):
    return config_from_dict(tiny_config(resources={"num_cpus_per_client": 1, **resources}))


def test_num_actors_is_taken_as_asked_when_the_local_ray_holds_it():
    assert plan_actors(cfg(), {"CPU": 2.0}) == 2
    assert plan_actors(cfg(num_actors=1), {"CPU": 2.0}) == 1
    assert plan_actors(cfg(num_actors=3, num_cpus_per_client=0), {"CPU": 2.0}) == 3
    assert plan_actors(cfg(num_actors=9, num_cpus_per_client=0), {"CPU": 2.0}) == 4  # 4 clients
    with pytest.raises(ConfigError, match=r"^resources.num_actors=3: the Ray cluster holds at"):
        plan_actors(cfg(num_actors=3), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="num_gpus_per_client=1: the Ray cluster has 0 GPUs"):
        plan_actors(cfg(num_gpus_per_client=1, num_actors=1), {"CPU": 2.0})


def test_resources_fields_are_checked_at_parse_time():
    assert cfg().resources.acquire_timeout_s == 600 and cfg().resources.num_actors is None
    for bad in ({"num_actors": 0}, {"acquire_timeout_s": 0}):
        with pytest.raises(ConfigError):
            cfg(**bad)


def test_a_requested_actor_count_is_capped_at_the_clients():
    limits = acquire.ClusterLimits(False, None, None, ({"CPU": 8.0},), "test")
    assert acquire.plan_num_actors(4, {"CPU": 1.0}, limits, requested=6) == 4


def test_placement_says_where_each_client_ran():
    gpu = describe_where("n1", "cpu", ["0"])
    assert gpu == "n1/cpu (GPU 0)" and describe_where("n2", "cuda", []) == "n2/cuda"
    assert describe_where("n3", None, ["0", "1"]) == "n3/none (GPU 0,1)"
    placement = Placement(2, where={0: gpu, 1: "n2/cuda"})
    assert placement.of_clients({3: 1, 0: 0, 2: 5}) == {"0": gpu, "2": "unknown", "3": "n2/cuda"}


def test_the_round_row_carries_the_placement_only_when_there_is_one():
    report = AggregationReport(1, accepted=[0], aggregated=True)
    row = round_row(1, {}, report, [0], [], 1.0, placement={"0": "n1/cpu"})
    assert row["placement"] == {"0": "n1/cpu"}
    assert "placement" not in round_row(1, {}, report, [0], [], 1.0)


def test_a_tune_trial_on_an_autoscaling_cluster_reserves_what_the_node_types_could_hold():
    from fedbip_ray.tuning.space import TuneSettings
    from fedbip_ray.tuning.trials import trial_bundles

    head = acquire.NodeType("ray.head.default", {"CPU": 1.0}, 1, head=True)
    gpu = acquire.NodeType("gpu_worker", {"CPU": 1.0, "GPU": 1.0}, 3)
    scaling = acquire.ClusterLimits(True, (head, gpu), 3, ({"CPU": 1.0},), "test")
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    one, two = (TuneSettings(max_concurrent=k, space=space) for k in (1, 2))
    b = {"CPU": 1.0, "GPU": 1.0}
    present = {"CPU": 1.0}  # no GPU node yet: the trials' groups make the autoscaler add them
    assert trial_bundles(cfg(num_gpus_per_client=1), one, present, scaling) == (3, [{}, b, b, b])
    assert trial_bundles(cfg(num_gpus_per_client=1), two, present, scaling) == (1, [{}, b])
    assert trial_bundles(cfg(num_gpus_per_client=1, num_actors=2), one, present, scaling) == (
        2, [{}, b, b])
    with pytest.raises(ConfigError, match=r"^tune.actors_per_trial=4: one trial needs 4 bundles"):
        trial_bundles(cfg(num_gpus_per_client=1), TuneSettings(actors_per_trial=4, space=space),
                      present, scaling)
