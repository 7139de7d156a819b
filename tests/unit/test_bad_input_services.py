"""Services that do not answer (a Ray address, a tracking server) are found out within
seconds, before anything is written or any actor starts: exit 2 with one line."""

from __future__ import annotations

import time

import pytest

from fedbip_ray.cli import main
from fedbip_ray.runtime.cluster import ray_address_endpoint

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
def test_a_service_that_does_not_answer_is_one_line_within_seconds(case, env, tmp_path, capfd,
                                                                    monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = case.argv(tmp_path)
    capfd.readouterr()
    t0 = time.monotonic()
    code = main(argv)
    took = time.monotonic() - t0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("fedbip: error: ") and case.needle in lines[0], lines[0]
    assert took < 20, f"took {took:.1f}s"
    assert not (tmp_path / "out" / "shards").exists()  # found out before any work


@pytest.mark.parametrize("address,want", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)), ("ray://head:10001", ("head", 10001)),
    ("http://127.0.0.1:8265", ("127.0.0.1", 8265)), ("auto", None), ("local", None)])
def test_ray_address_endpoint(address, want):
    assert ray_address_endpoint(address) == want
