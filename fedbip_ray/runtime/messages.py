"""Typed messages between the driver, client actors and the server actor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns from ``fit``: its task vector tau = theta_after - theta_received.

    ``vector`` is (D,) float32 in the order of ``layout`` (a ``Layout.to_dict()``);
    ``signal`` (D,) float32 is the negated sum of the round's loss gradients, sent when the
    strategy compares gradients (``reference="gradient"``), else None.
    """

    client_id: int
    round: int
    vector: np.ndarray
    layout: dict[str, Any]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    signal: np.ndarray | None = None


@dataclass(frozen=True)
class EvalResult:
    """Per-client evaluation on its own splits: ``{"val": {...}, "test": {...}}``."""

    client_id: int
    round: int
    splits: dict[str, dict[str, float]]


@dataclass(frozen=True)
class ShardRef:
    """A client's data shard as an ObjectRef of its Parquet bytes.

    Sent with every ``fit``/``evaluate`` call (wrapped, so Ray does not resolve it): an actor
    fetches the bytes only on a cache miss, and a restarted actor gets them back with its next
    call. The driver holds the refs for the whole run, so restarts never lose them.
    """

    client_id: int
    ref: Any
