"""Joining clients: a newcomer's personalized aggregate from the clients most like it.

A federation stores one personalized state per client, ``states`` ``(N, D)``, all started from
one initial adapter ``init`` ``(D,)``. A newcomer fine-tunes ``init`` on its own data, which
gives its first task vector ``τ`` ``(D,)`` (cumulative, since it started from ``init``). The
join runs the federation's own strategy on one :class:`~.interface.AggregationInput` whose rows
are the informed stored clients (cumulative vectors ``states_k − init``) and the newcomers
(``τ``): every row starts from ``init``, so a newcomer's row of the result is
``init + Σ_k w_k c_k`` over the compared cumulative vectors ``c_k``. Only the newcomers' rows
are kept: the join never changes a stored client.

A stored client whose state is still ``init`` (it never took part) carries no information and
is left out (weight 0, similarity NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .interface import AggregationInput, Strategy
from .taskvector import Layout

__all__ = ["SIMILARITY_STRATEGIES", "NewcomerAggregate", "informed_rows", "join_aggregate",
           "join_input", "personalizes_by_similarity"]

SIMILARITY_STRATEGIES: tuple[str, ...] = ("fedbip", "fedbip-layer", "fedbip-paper")


@dataclass(frozen=True)
class NewcomerAggregate:
    """One newcomer's join outcome.

    Attributes:
        state: ``(D,)`` float32 personalized aggregate.
        weights: ``(N + K,)`` float64 weights on the ``N`` stored clients, then on the ``K``
            newcomers of its aggregation (``K = 1``, itself, unless they joined together);
            its own entry is ``num_stored + index``; sums to 1.
        similarity: ``(N + K,)`` float64 similarity row used (NaN for stored clients left
            out), None when the strategy uses no similarity.
        num_stored: ``N``.
        index: this newcomer's position among the ``K``.
    """

    state: np.ndarray
    weights: np.ndarray
    similarity: np.ndarray | None
    num_stored: int
    index: int

    @property
    def self_weight(self) -> float:
        """Weight the aggregate keeps on the newcomer's own task vector."""
        return float(self.weights[self.num_stored + self.index])

    def weight_on(self, stored: np.ndarray) -> float:
        """Total weight on the stored clients selected by ``stored`` (ids or an (N,) mask)."""
        w = self.weights[: self.num_stored]
        sel = np.asarray(stored)
        return float(w[sel].sum()) if sel.size else 0.0


def personalizes_by_similarity(strategy: Strategy) -> bool:
    """True for the strategies that weigh clients by task-vector similarity (FedBip family)."""
    return strategy.name in SIMILARITY_STRATEGIES


def informed_rows(states: np.ndarray, init: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: stored clients whose state differs from ``init`` ``(D,)`` anywhere."""
    s = np.asarray(states)
    if s.ndim != 2 or s.shape[1:] != np.shape(init):
        raise ValueError(f"states {s.shape} and init {np.shape(init)} do not match")
    return np.asarray([not np.array_equal(row, init) for row in s], dtype=bool)


def join_input(stored: np.ndarray, init: np.ndarray, newcomer_deltas: np.ndarray,
               layout: Layout, counts: np.ndarray, groups: np.ndarray | None = None,
               signals: bool = False) -> AggregationInput:
    """The join's aggregation input: ``N' + M`` rows, every one starting from ``init``.

    Args:
        stored: ``(N', D)`` float32 states of the informed stored clients.
        init: ``(D,)`` float32 initial adapter.
        newcomer_deltas: ``(M, D)`` float32 newcomers' task vectors from ``init``.
        counts: ``(N' + M,)`` training example counts.
        groups: ``(N' + M,)`` true groups (``oracle`` only), else None.
        signals: also pass the cumulative vectors as gradient signals (stored clients keep
            none, so a ``reference="gradient"`` strategy compares cumulative vectors).
    """
    base = np.asarray(init, dtype=np.float32)
    cum = np.asarray(stored, dtype=np.float32) - base[None, :]
    deltas = np.concatenate([cum, np.asarray(newcomer_deltas, dtype=np.float32)], axis=0)
    states = np.broadcast_to(base, deltas.shape)
    return AggregationInput(states=states, deltas=deltas, counts=np.asarray(counts),
                            layout=layout, init=base, groups=groups,
                            signals=deltas if signals else None)


def join_aggregate(strategy: Strategy, states: np.ndarray, init: np.ndarray,
                   newcomer_deltas: np.ndarray, layout: Layout, stored_counts: np.ndarray,
                   newcomer_counts: np.ndarray,
                   groups: tuple[np.ndarray, np.ndarray] | None = None,
                   together: bool = False) -> list[NewcomerAggregate]:
    """Personalized aggregates of ``M`` newcomers, computed with the federation's ``strategy``.

    Args:
        strategy: the federation's strategy (same similarity options and weights rule).
        states: ``(N, D)`` float32 stored personalized states (not modified).
        init: ``(D,)`` float32 initial adapter all clients started from.
        newcomer_deltas: ``(M, D)`` float32 task vectors of the newcomers' first local
            training from ``init``.
        layout: layout of ``D``.
        stored_counts: ``(N,)`` stored clients' training example counts.
        newcomer_counts: ``(M,)`` newcomers' training example counts.
        groups: ``((N,), (M,))`` true groups of the stored clients and the newcomers, needed
            only by ``oracle``.
        together: one aggregation over the stored clients and all ``M`` newcomers (they see
            each other; one strategy call); by default each newcomer joins on its own
            (``M`` calls, its result independent of the other newcomers).

    Returns:
        One :class:`NewcomerAggregate` per newcomer, in order.
    """
    new = np.atleast_2d(np.asarray(newcomer_deltas, dtype=np.float32))
    counts = np.asarray(newcomer_counts)
    keep = np.flatnonzero(informed_rows(states, init))
    blocks = [np.arange(len(new))] if together else [np.array([j]) for j in range(len(new))]
    out: list[NewcomerAggregate] = []
    for block in blocks:
        grp = (np.asarray(groups[0])[keep], np.asarray(groups[1])[block]) if groups else None
        out.extend(_join_block(strategy, np.asarray(states)[keep], keep, len(states), init,
                               new[block], layout, np.asarray(stored_counts)[keep],
                               counts[block], grp))
    return out


def _join_block(strategy: Strategy, stored: np.ndarray, keep: np.ndarray, n: int,
                init: np.ndarray, new: np.ndarray, layout: Layout, stored_counts: np.ndarray,
                counts: np.ndarray, groups: tuple[np.ndarray, np.ndarray] | None,
                ) -> list[NewcomerAggregate]:
    """One strategy call over the informed stored clients ``stored`` ``(N', D)`` (their ids
    ``keep`` among ``n``) and the newcomers ``new`` ``(K, D)``; the newcomers' rows."""
    m = len(new)
    grp = np.concatenate(groups) if groups is not None else None
    inp = join_input(stored, init, new, layout, np.concatenate([stored_counts, counts]), grp,
                     strategy.client_options.send_gradient)
    result = strategy.aggregate(inp)
    cols = np.concatenate([keep, n + np.arange(m)])
    out = []
    for j in range(m):
        row = len(keep) + j
        weights = np.zeros(n + m)
        weights[cols] = np.asarray(result.weights, dtype=np.float64)[row]
        sim = None
        if result.similarity is not None:
            sim = np.full(n + m, np.nan)
            sim[cols] = np.asarray(result.similarity, dtype=np.float64)[row]
        state = np.asarray(result.states[row], dtype=np.float32).copy()
        out.append(NewcomerAggregate(state, weights, sim, n, j))
    return out
