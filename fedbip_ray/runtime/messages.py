"""Typed messages between the driver, client actors and the server actor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fedbip_ray.config import Config
from fedbip_ray.core.strategies import Strategy, make_strategy
from fedbip_ray.core.taskvector import Layout


@dataclass(frozen=True)
class ClientUpdate:
    """What a client returns from ``fit``: its task vector tau = theta_after - theta_received.

    ``vector`` is (D,) float32 in the order of ``layout``;
    ``signal`` (D,) float32 is the negated sum of the round's loss gradients, sent when the
    strategy compares gradients (``reference="gradient"``), else None.
    """

    client_id: int
    round: int
    vector: np.ndarray
    layout: Layout
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    signal: np.ndarray | None = None


@dataclass(frozen=True)
class EvalResult:
    """Per-client evaluation on its own splits: ``{"val": {"accuracy", "loss", ...}, "test":
    {...}}``."""

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


@dataclass
class AggregationReport:
    """What one round's aggregation did, built by the server and completed by the driver.

    Client ids are ints. ``similarity`` / ``weights`` are (N_t, N_t) float64 over ``accepted``
    (in that order), None when nothing was aggregated or the strategy has no similarity.
    The driver adds ``failed`` (clients whose fit never reached the server), ``bytes_out``,
    ``gate`` (λ chosen per client), ``gate_locals_sent`` and ``phase_seconds``.
    """

    round: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    modified: list[int] = field(default_factory=list)  # server changed τ (clip, DP): send local
    aggregated: bool = False
    similarity: np.ndarray | None = None
    weights: np.ndarray | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    train_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    train_steps: float = 0.0
    client_peak_rss_mib: float = float("nan")
    bytes_in: int = 0
    bytes_out: int = 0
    gate: dict[int, float] = field(default_factory=dict)
    gate_locals_sent: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NoiseSettings:
    """Client-level DP on the server: clip each task vector to L2 ``clip_norm``, add
    N(0, (noise_multiplier * clip_norm)^2) noise."""

    clip_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs, built once by the driver from the validated config.

    ``groups`` (num_clients,) are the true groups when known; ``privacy`` None is off.
    """

    strategy: Strategy
    num_clients: int
    groups: tuple[int, ...] | None = None
    max_norm: float | None = None
    on_excess_norm: Literal["reject", "clip"] = "reject"
    privacy: NoiseSettings | None = None
    seed: int = 0

    @classmethod
    def of(cls, strategy: str, params: dict[str, Any], num_clients: int,
           groups: Sequence[int] | None = None, **kw: Any) -> ServerSettings:
        """Settings for a strategy given by name and raw params (tests, benchmarks, replay)."""
        return cls(make_strategy(strategy, params), num_clients,
                   tuple(groups) if groups is not None else None, **kw)

    @classmethod
    def from_config(cls, cfg: Config, strategy: Strategy, groups: Sequence[int]) -> ServerSettings:
        """The run's server settings (``strategy``: the run's, built once; ``groups``: one
        per client of the run's shards)."""
        upd, pc = cfg.federation.updates, cfg.privacy
        noise = (NoiseSettings(float(pc.clip_norm), float(pc.noise_multiplier))
                 if pc.clip_norm is not None else None)
        return cls(strategy, len(groups), tuple(int(g) for g in groups), upd.max_norm,
                   upd.on_excess_norm, noise, cfg.seed)
