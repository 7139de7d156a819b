"""Services that do not answer (a Ray address, a tracking server) are found out within
seconds, before anything is written or any actor starts: exit 2 with one line."""

from __future__ import annotations

import time

import pytest

from fedbip_ray.runtime.cluster import ray_address_endpoint

from ..conftest import fedbip_cli
from .test_bad_input import Case, _sets

SERVICE_CASES = [
    (Case("tracking-server-down", "tracking URI http://127.0.0.1:9: no MLflow server answers",
          args=_sets("tracking.mlflow=true", "tracking.tracking_uri=http://127.0.0.1:9")), {}),
    (Case("ray-address-nobody-home", "RAY_ADDRESS=127.0.0.1:9: no Ray cluster answers"),
     {"RAY_ADDRESS": "127.0.0.1:9"}),
    (Case("ray-client-address-nobody-home", "RAY_ADDRESS=ray://127.0.0.1:9: no Ray cluster"),
     {"RAY_ADDRESS": "ray://127.0.0.1:9"}),
    (Case("ray-address-not-host-port", "RAY_ADDRESS=127.0.0.1:http: not host:port"),
     {"RAY_ADDRESS": "127.0.0.1:http"}),
]


@pytest.mark.parametrize("case,env", [pytest.param(c, e, id=c.id) for c, e in SERVICE_CASES])
def test_a_service_that_does_not_answer_is_one_line_within_seconds(case, env, tmp_path):
    """Through the installed command, in a fresh process (an in-process Ray, as other tests
    of the session start, would hide the address check)."""
    argv = case.argv(tmp_path)
    t0 = time.monotonic()
    proc = fedbip_cli(argv, env, tmp_path)
    took = time.monotonic() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedbip: error: ") and case.needle in lines[0], lines[0]
    assert took < 30, f"took {took:.1f}s"
    assert not (tmp_path / "out" / "shards").exists()  # found out before any work


@pytest.mark.parametrize("address,want", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)), ("ray://head:10001", ("head", 10001)),
    ("http://127.0.0.1:8265", ("127.0.0.1", 8265)), ("auto", None), ("local", None)])
def test_ray_address_endpoint(address, want):
    assert ray_address_endpoint(address) == want
