"""A fake multi-node Ray cluster (``cluster.local.yaml``) for e2e tests, started with no workers.

Use it from a test module with ``from .multinode import multinode_cluster  # noqa: F401``; it
yields a :class:`fedbip_ray.runtime.local_cluster.LocalCluster` (``gcs_address`` for
``RAY_ADDRESS``, ``dashboard_url`` for ``ray job submit --address``). Talk to it from
subprocesses (:func:`cluster_env`), so that a Ray already initialised in the test process by
other fixtures is left alone. At the end exactly its processes are stopped, by pid.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbip_ray.runtime import local_cluster
from fedbip_ray.runtime.local_cluster import LocalCluster


def cluster_env(cluster: LocalCluster) -> dict[str, str]:
    """Environment for a subprocess that joins ``cluster`` (``RAY_ADDRESS`` set)."""
    env = local_cluster.ray_env({"RAY_ADDRESS": cluster.gcs_address, "HF_HUB_OFFLINE": "1"})
    env.pop("RAY_FAKE_CLUSTER", None)
    return env


@pytest.fixture(scope="session")
def multinode_cluster() -> Iterator[LocalCluster]:
    """The fake multi-node cluster: a CPU head, GPU workers added by its autoscaler on demand."""
    tmp = Path(tempfile.mkdtemp(prefix="fbmn", dir="/tmp"))
    cluster = local_cluster.start(tmp)
    try:
        yield cluster
    finally:
        local_cluster.stop(tmp)
        left = local_cluster.cluster_pids(tmp)
        assert not left, f"processes of the test cluster still alive: {left}"
        shutil.rmtree(tmp, ignore_errors=True)
