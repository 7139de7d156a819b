"""End to end on a fake multi-node cluster: client resources come from the autoscaler."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from ..conftest import REPO
from .multinode import cluster_env, multinode_cluster  # noqa: F401

pytestmark = pytest.mark.e2e


def probe() -> None:
    """Runs in a subprocess joined to the cluster; prints one JSON object of what it saw."""
    import ray

    from fedbip_ray.config import ConfigError
    from fedbip_ray.runtime import acquire

    ray.init(logging_level="ERROR", log_to_driver=False)
    out: dict[str, Any] = {"nodes_before": len(acquire.alive_nodes())}
    start = time.monotonic()
    try:
        acquire.acquire_bundles(2, 1, 5, timeout_s=60, echo=lambda _: None)
        out["never"] = None
    except ConfigError as exc:
        out["never"] = str(exc)
    out["never_s"] = time.monotonic() - start

    @ray.remote
    class Where:
        def where(self) -> tuple[str, list]:
            return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    lines: list[str] = []
    start = time.monotonic()
    pg = acquire.acquire_bundles(2, 1, 1, timeout_s=120, echo=lines.append, progress_s=2)
    out["acquire_s"] = time.monotonic() - start
    actors = [Where.options(num_cpus=1, num_gpus=1, **acquire.actor_options(pg, i)).remote()
              for i in range(2)]
    out["actors"] = ray.get([a.where.remote() for a in actors], timeout=120)
    out["bundle_nodes"] = acquire.bundle_nodes(pg)
    out["nodes_after"] = len(acquire.alive_nodes())
    out["lines"] = lines
    for a in actors:
        ray.kill(a)
    acquire.release_bundles(pg)
    print("PROBE " + json.dumps(out))


@pytest.fixture(scope="module")
def seen(multinode_cluster) -> dict[str, Any]:  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.e2e.test_multinode import probe; probe()"],
        cwd=REPO, env=cluster_env(multinode_cluster), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(lines[-1][len("PROBE "):])
    print({k: seen[k] for k in ("nodes_before", "nodes_after", "acquire_s", "never_s", "actors")})
    return seen


def test_autoscaler_adds_a_gpu_node_per_bundle(seen):
    assert seen["nodes_before"] == 1  # a fresh cluster: the CPU head only
    assert seen["nodes_after"] - seen["nodes_before"] >= 2
    assert seen["lines"][-1].startswith("client resources ready: 2 bundles {CPU: 1, GPU: 1} on 2 nodes")
    nodes = [node for node, _ in seen["actors"]]
    assert len(set(nodes)) == 2 and set(nodes) == set(seen["bundle_nodes"])
    assert all(gpus == ["0"] for _, gpus in seen["actors"])


def test_a_request_no_node_can_hold_fails_at_once_in_one_line(seen):
    msg = seen["never"]
    assert msg is not None and "\n" not in msg
    assert msg.startswith("resources.num_gpus_per_client=5: no node can ever hold")
    assert "gpu_worker {CPU: 1, GPU: 1} x3" in msg
    assert seen["never_s"] < 10
