"""Typed messages between the driver, client actors and the server actor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fedbip_ray.config import Config
from fedbip_ray.core.matrix_view import VIEW_CELLS, block_mean, cluster_order
from fedbip_ray.core.strategies import Strategy, make_strategy
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.storage import Location

FULL_MATRIX_MAX = 64  # participants up to which reports and similarity.jsonl hold the matrices


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
class ALAResult:
    """FedALA's adaptive local aggregation of one client (:mod:`fedbip_ray.core.fedala`):
    ``state`` (D,) float32 its new start model ``θ + (g − θ) ⊙ W`` (``g`` on the lower
    layers); ``weights`` (P,) float32 the learned ``W`` of the higher layers (None: skipped,
    ``g`` equals ``θ`` there); ``epochs`` of weight learning; ``loss`` the last batch's."""

    client_id: int
    round: int
    state: np.ndarray
    weights: np.ndarray | None
    epochs: int
    loss: float


@dataclass(frozen=True)
class EvalResult:
    """Per-client evaluation on its own splits: ``{"val": {"accuracy", "loss", ...}, "test":
    {...}}``."""

    client_id: int
    round: int
    splits: dict[str, dict[str, float]]


@dataclass(frozen=True)
class StateSlices:
    """A client's state held by a sharded server: the ObjectRefs of its ``K`` column slices,
    in column order (wrapped, so Ray hands the refs over unresolved); :func:`resolve_state`
    joins them where the state is used."""

    refs: tuple[Any, ...]


def resolve_state(state: Any) -> Any:
    """``state`` as one ``(D,)`` array: a :class:`StateSlices` is fetched and joined; anything
    else (an array, None) is returned as it is."""
    if isinstance(state, StateSlices):
        import ray

        return np.concatenate(ray.get(list(state.refs)))
    return state


@dataclass(frozen=True)
class ShardRef:
    """A client's data shard as an ObjectRef of its Parquet bytes.

    Sent with every ``fit``/``evaluate`` call (wrapped, so Ray does not resolve it): an actor
    fetches the bytes only on a cache miss, and a restarted actor gets them back with its next
    call. The driver holds the refs for the whole run, so restarts never lose them.
    """

    client_id: int
    ref: Any


@dataclass(frozen=True)
class BlockView:
    """An (N, N) matrix reordered (true groups, else :func:`cluster_order`) and averaged over
    blocks of consecutive clients: ``similarity`` / ``weights`` (C, C) float32 with C <=
    ``VIEW_CELLS``; ``labels`` (C,) names each block (``g<group>`` or ``#<first position>``)."""

    labels: tuple[str, ...]
    similarity: np.ndarray | None
    weights: np.ndarray


@dataclass(frozen=True)
class MatrixSummary:
    """Bounded view of one round's matrices over ``AggregationReport.accepted`` (N_t x k, not
    N_t x N_t): each client's ``k`` largest-weight peers (self excluded) as ``neighbors``
    (N_t, k) int64 client ids, their ``neighbor_weights`` and ``neighbor_similarity`` (N_t, k)
    float32, ``self_weight`` (N_t,) float32, the heatmap ``view`` and the matrices' ``file``
    (relative to the run's output; None when not written)."""

    neighbors: np.ndarray
    neighbor_weights: np.ndarray
    neighbor_similarity: np.ndarray | None
    self_weight: np.ndarray
    view: BlockView
    file: str | None = None

    @classmethod
    def of(cls, ids: Sequence[int], similarity: np.ndarray | None, weights: np.ndarray,
           top_k: int, groups: np.ndarray | None = None,
           file: str | None = None) -> MatrixSummary:
        """From (N_t, N_t) ``similarity`` (or None) and ``weights`` over clients ``ids``."""
        w = np.asarray(weights, dtype=np.float32)
        n = len(ids)
        k = max(0, min(top_k, n - 1))
        masked = w.copy()
        np.fill_diagonal(masked, -np.inf)
        rows = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        ids_arr = np.asarray(ids, dtype=np.int64)
        sim = None
        if similarity is not None:
            sim = np.take_along_axis(np.asarray(similarity, dtype=np.float32), rows, axis=1)
        return cls(ids_arr[rows], np.take_along_axis(w, rows, axis=1), sim,
                   np.diagonal(w).copy(), block_view(similarity, weights, groups), file)


def block_view(similarity: np.ndarray | None, weights: np.ndarray,
               groups: np.ndarray | None = None, cells: int = VIEW_CELLS) -> BlockView:
    """The heatmap view of (N, N) matrices: clients sorted by true group (when known) or by
    :func:`cluster_order` of the similarity (weights without one), then :func:`block_mean`."""
    n = len(weights)
    if groups is not None:
        order = np.argsort(np.asarray(groups), kind="stable")
    else:
        order = cluster_order(similarity if similarity is not None else weights)
    if n <= cells:
        order = np.arange(n)  # full view: the clients' own order
    starts = np.linspace(0, n, min(n, cells) + 1).astype(np.int64)[:-1]
    labels = (tuple(f"g{int(np.asarray(groups)[order[s]])}" for s in starts)
              if groups is not None and n > cells else tuple(f"#{int(s)}" for s in starts))
    sub = np.ix_(order, order)
    sim = block_mean(np.asarray(similarity)[sub], cells) if similarity is not None else None
    return BlockView(labels, sim, block_mean(np.asarray(weights)[sub], cells))


@dataclass
class AggregationReport:
    """What one round's aggregation did, built by the server and completed by the driver.

    Client ids are ints. ``similarity`` / ``weights`` are (N_t, N_t) float64 over ``accepted``
    (in that order) for N_t <= ``FULL_MATRIX_MAX``, else None (as when nothing was aggregated or
    the strategy has no similarity); ``summary`` is their bounded view at any N_t (the server
    writes the full matrices to ``similarity/round_XXXXX.npz`` at the run's output).
    The driver adds ``failed`` (clients whose fit never reached the server), ``bytes_out``,
    ``gate`` (λ chosen per client), ``gate_scores`` (per client one ``{accuracy, n, loss,
    loss_sd}`` per gate mix), ``gate_locals_sent`` and ``phase_seconds``.
    """

    round: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    modified: list[int] = field(default_factory=list)  # server changed τ (clip, DP): send local
    aggregated: bool = False
    similarity: np.ndarray | None = None
    weights: np.ndarray | None = None
    summary: MatrixSummary | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)
    train_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    train_steps: float = 0.0
    client_peak_rss_mib: float = float("nan")
    bytes_in: int = 0
    bytes_out: int = 0
    gate: dict[int, float] = field(default_factory=dict)
    gate_scores: dict[int, list[dict[str, float]]] = field(default_factory=dict)
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

    ``groups`` (num_clients,) are the true groups when known; ``privacy`` None is off;
    ``output`` is where the server writes each round's matrices (None: nowhere); ``top_k``
    the neighbours per client in a report's :class:`MatrixSummary`.
    """

    strategy: Strategy
    num_clients: int
    groups: tuple[int, ...] | None = None
    max_norm: float | None = None
    on_excess_norm: Literal["reject", "clip"] = "reject"
    privacy: NoiseSettings | None = None
    seed: int = 0
    output: Location | None = None
    top_k: int = 8

    @classmethod
    def of(cls, strategy: str, params: dict[str, Any], num_clients: int,
           groups: Sequence[int] | None = None, **kw: Any) -> ServerSettings:
        """Settings for a strategy given by name and raw params (tests, benchmarks, replay)."""
        return cls(make_strategy(strategy, params), num_clients,
                   tuple(groups) if groups is not None else None, **kw)

    @classmethod
    def from_config(cls, cfg: Config, strategy: Strategy, groups: Sequence[int],
                    output: Location | None = None) -> ServerSettings:
        """The run's server settings (``strategy``: the run's, built once; ``groups``: one
        per client of the run's shards; ``output``: the run's output location)."""
        upd, pc = cfg.federation.updates, cfg.privacy
        noise = (NoiseSettings(float(pc.clip_norm), float(pc.noise_multiplier))
                 if pc.clip_norm is not None else None)
        return cls(strategy, len(groups), tuple(int(g) for g in groups), upd.max_norm,
                   upd.on_excess_norm, noise, cfg.seed, output, cfg.federation.report_top_k)
