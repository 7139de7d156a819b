"""The driver never fetches a client's update or an adapter state during a round: task vectors
go from the client actors to the server actor through the object store, states from the
server actor to the client actors. The driver's ``ray.get`` sees only small receipts, scores
and reports.

``ray.get`` and ``ray.wait`` are wrapped in this (the driver's) process, where the round
loop's modules call them; the checkpoint writer's thread, which fetches the server's states
between rounds by design, is told apart by its thread name."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import fedbip_ray.runtime.dispatch as dispatch_mod
import fedbip_ray.runtime.federation as federation_mod
import fedbip_ray.runtime.phases as phases_mod
from fedbip_ray.config import config_from_dict
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.runtime.messages import AggregationReport, ClientUpdate, EvalResult

from ..conftest import tiny_config

pytestmark = pytest.mark.ray

CHECKPOINT_THREAD = "fedbip-checkpoint"


@dataclass
class Fetch:
    """One value the driver got from ``ray.get``: its type, the (shape, dtype) of every array
    inside it, and whether a ClientUpdate was inside it."""

    thread: str
    kind: str
    arrays: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    update: bool = False


def _inspect(value: Any, fetch: Fetch, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(value, ClientUpdate):
        fetch.update = True
    if isinstance(value, np.ndarray):
        fetch.arrays.append((tuple(value.shape), str(value.dtype)))
    elif isinstance(value, dict):
        for v in value.values():
            _inspect(v, fetch, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            _inspect(v, fetch, depth + 1)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            _inspect(getattr(value, name), fetch, depth + 1)


@dataclass
class Spy:
    """Records every value ``ray.get`` returns in the driver, and every ``ray.wait``."""

    fetches: list[Fetch] = field(default_factory=list)
    waits: int = 0

    def wrap(self, get: Any, wait: Any) -> tuple[Any, Any]:
        def spy_get(refs: Any, *args: Any, **kwargs: Any) -> Any:
            value = get(refs, *args, **kwargs)
            name = threading.current_thread().name
            for v in value if isinstance(refs, list) else [value]:
                fetch = Fetch(name, type(v).__name__)
                _inspect(v, fetch)
                self.fetches.append(fetch)
            return value

        def spy_wait(*args: Any, **kwargs: Any) -> Any:
            self.waits += 1
            return wait(*args, **kwargs)

        return spy_get, spy_wait


def test_the_driver_fetches_no_update_and_no_state(ray_local, tmp_path, monkeypatch):
    # the default fedbip: fit, aggregation, validation gate (with its resends), evaluation;
    # 4 clients on 2 actors, so actors serve clients other than their own
    cfg = config_from_dict(tiny_config(federation={"rounds": 2}, train={"local_epochs": 1}))
    spy = Spy()
    ray = dispatch_mod.ray
    assert phases_mod.ray is ray and federation_mod.ray is ray  # one module object to wrap
    spy_get, spy_wait = spy.wrap(ray.get, ray.wait)
    monkeypatch.setattr(ray, "get", spy_get)
    monkeypatch.setattr(ray, "wait", spy_wait)
    out = tmp_path / "out"
    summary = run_federation(cfg, out, echo=lambda s: None)
    monkeypatch.undo()
    assert summary["rounds_completed"] == 2

    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    dim = json.loads((out / "checkpoints" / latest["path"] / "layout.json").read_text())
    dim = int(sum(np.prod(s) for s in dim["shapes"]))
    assert dim > 1000
    driver = [f for f in spy.fetches if not f.thread.startswith(CHECKPOINT_THREAD)]
    ckpt = [f for f in spy.fetches if f.thread.startswith(CHECKPOINT_THREAD)]
    assert spy.waits > 0 and len(driver) > 20  # the spy saw the round loop's calls
    assert not [f for f in spy.fetches if f.update]
    big = [f for f in driver if any(dim in shape or int(np.prod(shape)) >= dim
                                    for shape, _ in f.arrays)]
    assert not big, big
    kinds = {f.kind for f in driver}
    assert "int" in kinds  # the fit receipts: client ids
    assert {AggregationReport.__name__, EvalResult.__name__} <= kinds
    # the checkpoint writer (between rounds) is the one that fetches the server's states
    assert any(((4, dim), "float32") in f.arrays for f in ckpt)
