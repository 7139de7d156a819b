"""A fake multi-node Ray cluster (``cluster.local.yaml``) for e2e tests, started with no workers.

Use it from a test module with ``from .multinode import multinode_cluster  # noqa: F401``; it
yields a :class:`fedbip_ray.runtime.local_cluster.LocalCluster` (``gcs_address`` for
``RAY_ADDRESS``, ``dashboard_url`` for ``ray job submit --address``). Talk to it from
subprocesses (:func:`cluster_env`, :func:`submit`), so that a Ray already initialised in the
test process by other fixtures is left alone. At the end exactly its processes are stopped,
by pid.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbip_ray.runtime import local_cluster
from fedbip_ray.runtime.local_cluster import LocalCluster

RAY = str(Path(sys.executable).parent / "ray")
# the GCS declares a node dead after 3 missed checks 1 s apart (Ray's default: 5, 3 s apart)
FAST_NODE_LOSS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def cluster_env(cluster: LocalCluster) -> dict[str, str]:
    """Environment for a subprocess that joins ``cluster`` (``RAY_ADDRESS`` set)."""
    env = local_cluster.ray_env({"RAY_ADDRESS": cluster.gcs_address, "HF_HUB_OFFLINE": "1"})
    env.pop("RAY_FAKE_CLUSTER", None)
    return env


def submit(cluster: LocalCluster, cwd: Path, *entrypoint: str,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``entrypoint`` on ``cluster`` (retried while the head's job agent
    answers "No available agent", which it does for a while after start).

    No ``--working-dir``: the job runs the project installed on every node, as on a cluster
    whose nodes ran ``scripts/install.sh`` (cluster.yaml), so ``entrypoint`` must name its
    files by absolute path. On this one-machine cluster every node shares one session
    directory, and each node's runtime-env agent unpacks a working dir again the first time it
    needs it (deleting the copy the others are running from); the single-node job test covers
    ``--working-dir``."""
    env = cluster_env(cluster)
    env.pop("RAY_ADDRESS")
    start = time.monotonic()
    while True:
        proc = subprocess.run(
            [RAY, "job", "submit", "--address", cluster.dashboard_url, "--", *entrypoint],
            cwd=cwd, env=env, capture_output=True, text=True,
            timeout=max(30.0, start + timeout - time.monotonic()))
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() - start > 90:
            return proc
        time.sleep(3)


def alive_nodes(cluster: LocalCluster) -> dict[str, dict]:
    """{node id: node} of the cluster's alive nodes (from its dashboard)."""
    return {n["node_id"]: n for n in local_cluster.nodes(cluster) if n["state"] == "ALIVE"}


@pytest.fixture(scope="session")
def multinode_cluster() -> Iterator[LocalCluster]:
    """The fake multi-node cluster: a CPU head, GPU workers added by its autoscaler on demand."""
    tmp = Path(tempfile.mkdtemp(prefix="fbmn", dir="/tmp"))
    cluster = local_cluster.start(tmp, env=FAST_NODE_LOSS)
    try:
        yield cluster
    finally:
        local_cluster.stop(tmp)
        left = local_cluster.cluster_pids(tmp)
        assert not left, f"processes of the test cluster still alive: {left}"
        shutil.rmtree(tmp, ignore_errors=True)
