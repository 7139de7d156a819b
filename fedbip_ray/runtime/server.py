"""Server: per-client personalized states + core aggregation. ``ServerActor`` is its Ray shell.

The states are held in column blocks (:mod:`.server_block`), and every decision that needs the
whole vector is taken by one :class:`~.server_coordinator.Coordinator` from the blocks' small
summaries; :func:`aggregate_round` runs one round's steps over any blocks, here in one process
(``FederatedServer``, one block by default) or over Ray actors (:mod:`.sharded`, one actor per
block), with the same results.

The driver hands the server the clients' update ObjectRefs as they are (nested in a list, not
fetched); the server fetches each one itself, so one failed client cannot fail the others.
Every update is validated (layout, finiteness, norm) before it can reach aggregation; with
``privacy`` set, each accepted task vector is clipped and Gaussian noise is added (seeded per
round and per column chunk, so a resumed run, or another number of blocks, draws the same
noise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from fedbip_ray.core.blocks import Block, split_layout
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import AggregationReport, ClientUpdate, ServerSettings
from fedbip_ray.runtime.server_block import ServerBlock, all_finite
from fedbip_ray.runtime.server_coordinator import Coordinator, noise_seed, training_totals
from fedbip_ray.runtime.threads import blas_threads, set_blas_threads

__all__ = ["FederatedServer", "ServerActor", "aggregate_round", "all_finite", "failure_reason",
           "noise_seed", "slice_update", "training_totals"]

log = logging.getLogger("fedbip.server")
Call = Callable[..., Any]  # (object, method name, *args) -> value or ObjectRef


def local_call(obj: Any, method: str, *args: Any) -> Any:
    return getattr(obj, method)(*args)


def aggregate_round(call: Call, blocks: Sequence[Any], coordinator: Any, round_num: int,
                    client_ids: list[int], updates: Sequence[list[Any]], min_accepted: int,
                    send_gradient: bool) -> Any:
    """One round's aggregation over ``blocks`` (``updates[b]``: block ``b``'s slice of each
    client's update, or its ref): receipts, the coordinator's decision, the blocks'
    statistics, the plan (and the late joiners' plan), the blocks' apply step, the report.
    ``call`` runs a method in process or on an actor; every result is handed on as it is,
    so over actors only the report's ref comes back here."""
    receipts = [call(b, "receive", round_num, client_ids, ups, send_gradient)
                for b, ups in zip(blocks, updates, strict=True)]
    decision = call(coordinator, "decide", round_num, min_accepted, *receipts)
    stats = [call(b, "prepare", decision) for b in blocks]
    plan = call(coordinator, "plan", *stats)
    joins = [call(b, "join_statistics", plan) for b in blocks]
    plan = call(coordinator, "join_plan", *joins)
    done = [call(b, "apply", plan) for b in blocks]
    return call(coordinator, "finish", *done)


def slice_update(update: ClientUpdate, blocks: Sequence[Block]) -> list[ClientUpdate]:
    """``update`` as one update per block (its vector and signal cut to the block's
    columns, the block's layout); a vector of the wrong size is passed on whole (rejected)."""
    from dataclasses import replace

    vec = update.vector
    if len(blocks) == 1 or not isinstance(vec, np.ndarray) or vec.shape != (blocks[-1].stop,):
        return [update] * len(blocks)
    sig = update.signal
    return [replace(update, vector=vec[b.cols], layout=b.layout,
                    signal=sig[b.cols] if isinstance(sig, np.ndarray) else sig)
            for b in blocks]


class FederatedServer:
    """Each client's personalized adapter, in ``shards`` column blocks held in this process.

    ``settings.groups`` (num_clients,) are the true groups when known (oracle strategy,
    diagnostics); ``settings.privacy`` turns on client-level DP; ``settings.seed`` seeds the
    per-round DP noise.
    """

    def __init__(self, settings: ServerSettings, shards: int = 1) -> None:
        self.settings = settings
        self.strategy = settings.strategy
        self.num_clients = settings.num_clients
        self.shards = int(shards)
        self.coordinator = Coordinator(settings)
        self.blocks: list[ServerBlock] = []
        self.layout: Layout | None = None
        self.keep_last = False
        self._last: dict[str, Any] | None = None

    # -- state ------------------------------------------------------------------------------
    def _make_blocks(self, layout: Layout) -> None:
        self.layout = layout
        self.blocks = [ServerBlock(b, self.num_clients, self.strategy)
                       for b in split_layout(layout, self.shards)]
        for b in self.blocks:
            b.keep_last = self.keep_last

    def initialize(self, init: np.ndarray, layout: Layout) -> int:
        """Every client starts from the same initial adapter ``init`` (D,). Returns D."""
        self._make_blocks(layout)
        v = np.asarray(init, dtype=np.float32)
        for b in self.blocks:
            b.initialize(v[b.block.cols])
        self.coordinator.initialize(layout)
        return layout.size

    def _join(self, part: Callable[[ServerBlock], np.ndarray]) -> np.ndarray:
        parts = [part(b) for b in self.blocks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    @property
    def states(self) -> np.ndarray:
        """(num_clients, D) float32 (the block itself when there is one)."""
        assert self.blocks, "server not initialized"
        return self._join(lambda b: b.states)

    @property
    def init(self) -> np.ndarray | None:
        return self._join(lambda b: b.init) if self.blocks else None

    @property
    def similarity(self) -> np.ndarray | None:
        return self.coordinator.similarity

    @property
    def memory(self) -> np.ndarray | None:
        return self.coordinator.memory

    def get_state(self, client_id: int) -> np.ndarray:
        """(D,) float32 personalized state of one client."""
        assert self.blocks, "server not initialized"
        return self._join(lambda b: b.get_state(client_id)).copy()

    def all_states(self) -> np.ndarray:
        return self.states

    # -- aggregation ------------------------------------------------------------------------
    def aggregate(self, round_num: int, updates: list[ClientUpdate],
                  min_accepted: int = 1) -> AggregationReport:
        """Validate ``updates`` and apply the strategy to the clients that sent a valid one.

        With fewer than ``min_accepted`` valid updates the aggregation is skipped and every
        state is kept (``report.aggregated`` is False). The report holds accepted/rejected
        client ids, the similarity and weight matrices (accepted x accepted; up to
        ``FULL_MATRIX_MAX`` of them), their bounded summary and the bytes received.
        """
        return self.aggregate_refs(round_num, [u.client_id for u in updates], updates,
                                   min_accepted)

    def aggregate_refs(self, round_num: int, client_ids: list[int], refs: list[Any],
                       min_accepted: int = 1) -> AggregationReport:
        """``refs``: each client's :class:`ClientUpdate` or its ObjectRef; a failed one is
        reported in ``report.failed``, not raised."""
        assert self.blocks, "server not initialized"
        bounds = [b.block for b in self.blocks]
        per_block: list[list[Any]] = [[] for _ in self.blocks]
        for item in refs:
            parts = slice_update(item, bounds) if isinstance(item, ClientUpdate) \
                else [item] * len(bounds)
            for k, part in enumerate(parts):
                per_block[k].append(part)
        report = aggregate_round(local_call, self.blocks, self.coordinator, round_num,
                                 list(client_ids), per_block, min_accepted,
                                 self.strategy.client_options.send_gradient)
        if self.keep_last and report.aggregated:
            self._last = {"round": round_num, "clients": list(report.accepted),
                          "deltas": self._join(lambda b: b.last_deltas)}
        return report

    # -- validation gate (fedbip_ray.core.gate) --------------------------------------------
    def gate_local(self, client_id: int) -> np.ndarray:
        """(D,) float32: the client's own state after this round's training (its start state
        plus its validated task vector, clipped and noised under DP); its aggregate is
        :meth:`get_state` until :meth:`apply_gate`."""
        return self._join(lambda b: b.gate_local(client_id)).copy()

    def apply_gate(self, mixes: dict[int, float]) -> dict[int, float]:
        """Set each client's state to ``local + λ (aggregate − local)`` for its chosen ``λ``
        and drop the stored local states. Returns the ``λ`` applied per client."""
        rows, local = self.blocks[0]._gate if self.blocks else ({}, None)
        applied = {int(c): float(lam) for c, lam in mixes.items()
                   if local is not None and c in rows and lam != 1.0}
        for b in self.blocks:
            b.apply_gate(mixes)
        return applied

    # -- FedALA (fedbip_ray.core.fedala) ----------------------------------------------------
    def ala_weights(self, client_id: int) -> np.ndarray | None:
        """(P,) float32 the client's FedALA weights from its last adaptation (None: none)."""
        return self.coordinator.ala_weights(client_id)

    def apply_ala(self, round_num: int, client_ids: list[int], results: list[Any]) -> list[int]:
        """Each client's state becomes its :class:`~.messages.ALAResult` state (``results``:
        the results or their refs, fetched here) and its weights are kept; returns the
        clients set (one whose result failed keeps its aggregate)."""
        assert self.layout is not None
        done: list[int] = []
        for b in self.blocks:
            done = b.apply_ala(round_num, client_ids, results, self.layout.size)
        self.coordinator.remember_ala(round_num, client_ids, results)
        return done

    def keep_last_round(self, keep: bool = True) -> None:
        """Keep each aggregation's stacked task vectors until the next one (N_t x D float32
        between rounds) so that :meth:`last_round` can return them; off by default."""
        self.keep_last = keep
        for b in self.blocks:
            b.keep_last = keep
            if not keep:
                b.last_deltas = None
        if not keep:
            self._last = None

    def last_round(self) -> dict[str, Any] | None:
        """The accepted, validated task vectors of the latest aggregation (noised under DP):
        {"round", "clients", "deltas": (N_t, D) float32} when :meth:`keep_last_round` is on
        (replay tuning); None otherwise."""
        return self._last

    # -- checkpoints (the driver writes them: safetensors + JSON, never pickle) -------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], Layout]:
        """({"states": (N, D) f32, "init": (D,) f32, "similarity": (N, N) f64,
        "memory": (N, M) f64 when kept}, layout)."""
        assert self.blocks and self.layout is not None
        return {"states": self.states, "init": self.init, **self.coordinator.state_dict()}, \
            self.layout

    def load_state_dict(self, tensors: dict[str, np.ndarray], lay: Layout) -> int:
        """Restore what :meth:`state_dict` returned (shapes checked). Returns D."""
        states = np.asarray(tensors["states"], dtype=np.float32)
        if states.shape != (self.num_clients, lay.size):
            raise ValueError(f"checkpoint holds states {states.shape}, run needs "
                             f"({self.num_clients}, {lay.size})")
        self._make_blocks(lay)
        init = np.asarray(tensors["init"], dtype=np.float32)
        for b in self.blocks:
            b.load(states[:, b.block.cols], init[b.block.cols])
        self.coordinator.load(lay, tensors.get("similarity"), tensors.get("memory"))
        return lay.size

    def remember(self, idx: np.ndarray, memory: np.ndarray | None) -> None:
        """Keep the strategy's (N_t, M) memory rows of the participants ``idx``."""
        self.coordinator.remember(idx, memory)


@ray.remote(max_restarts=0)
class ServerActor(FederatedServer):
    """The server as a Ray actor: fetches update refs itself (driver never touches them).

    ``threads``: its BLAS/OpenMP threads (``resources.server_cpus``, at least 1)."""

    def __init__(self, settings: ServerSettings, threads: int = 1) -> None:
        self.threads = set_blas_threads(threads)
        super().__init__(settings)

    def blas_threads(self) -> int:
        """The threads the actor's BLAS pools run with now (the largest pool)."""
        return blas_threads()

    def get_state(self, client_id: int) -> np.ndarray:
        """(D,) float32 personalized state of one client: a view, which Ray copies into the
        object store as the call returns (before the actor runs its next call)."""
        assert self.blocks, "server not initialized"
        return self._join(lambda b: b.get_state(client_id))



def failure_reason(exc: BaseException) -> str:
    """``"Type: first line"`` of a client failure (a task error is named by its cause)."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
