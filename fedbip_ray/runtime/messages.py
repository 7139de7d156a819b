"""Typed messages between client actors and the server actor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns from ``fit``: its task vector tau = theta_after - theta_received.

    ``vector`` is (D,) float32 in the order of ``layout`` (a ``Layout.to_dict()``).
    """

    client_id: int
    round: int
    vector: np.ndarray
    layout: dict[str, Any]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    """Per-client evaluation on its own splits: ``{"val": {...}, "test": {...}}``."""

    client_id: int
    round: int
    splits: dict[str, dict[str, float]]
