"""One column block of the server's state: every client's columns ``[start, stop)``.

A :class:`ServerBlock` holds ``states`` ``(N, D_b)`` float32 for its block of the adapter,
receives the matching slice of each client update, and runs a round's column work: receipt
checks of its slices, DP noise for its columns, the strategy's statistics and its apply step,
the validation gate's local states. Everything that needs the whole vector (norm bounds, the
weights) is decided by the :class:`~fedbip_ray.runtime.server_coordinator.Coordinator` from
the blocks' small summaries. :class:`BlockActor` is its Ray shell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from fedbip_ray.core.aggregate import as_index
from fedbip_ray.core.blocks import Block, block_noise, param_sq_norms
from fedbip_ray.core.gate import mix_candidates
from fedbip_ray.core.interface import AggregationInput, Plan, Strategy
from fedbip_ray.core.join import join_input
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.core.validation import UpdateRejected, validate_update
from fedbip_ray.runtime.messages import ALAResult, ClientUpdate
from fedbip_ray.runtime.threads import set_blas_threads

log = logging.getLogger("fedbip.server")


@dataclass(frozen=True)
class SliceReceipt:
    """What one block saw of one client's update: ``reason`` (None: its slice passed the
    block's checks), the slice's per-parameter squared norms ``(P_b,)`` and bytes."""

    client_id: int
    reason: str | None
    sq_norms: np.ndarray | None
    nbytes: int
    num_examples: int = 0
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class Decision:
    """The coordinator's verdict on a round's updates: the accepted clients (in order), the
    factor each accepted task vector is scaled by before aggregation (norm clipping, DP
    clipping; 1 = as sent), the DP noise (std, seed; std 0 = none) and whether to aggregate."""

    round: int
    accepted: tuple[int, ...]
    scale: np.ndarray
    counts: np.ndarray
    noise_std: float
    noise_seed: int
    aggregate: bool


@dataclass(frozen=True)
class BlockStats:
    """A block's round summary: the strategy's statistics of its columns, and which
    participants' received states (``fresh``, ``(N_t,)``), trained states (``theta_init``,
    ``(N_t,)``) and which clients' stored states (``state_init``, ``(N,)``) equal ``init``
    on its columns (late joiners are fresh on every block)."""

    stats: Any
    fresh: np.ndarray
    theta_init: np.ndarray
    state_init: np.ndarray


@dataclass(frozen=True)
class JoinPlan:
    """Late joiners of a round: the informed stored clients ``keep`` and the joiners ``late``
    (ids), and the plan of their join aggregation (None: no late joiner)."""

    keep: tuple[int, ...] = ()
    late: tuple[int, ...] = ()
    plan: Plan | None = None


@dataclass(frozen=True)
class RoundPlan:
    """What every block applies: the round's ``plan`` (None: no aggregation) and its late
    joiners' ``join``."""

    plan: Plan | None
    join: JoinPlan = JoinPlan()


@dataclass(frozen=True)
class BlockDone:
    """A block's apply step: the rows it wrote and whether they are all finite."""

    rows: int
    finite: bool


def _fetch(x: Any) -> Any:
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def _row_is(rows: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``(R,)`` bool: which rows of ``rows`` ``(R, D_b)`` equal ``ref`` ``(D_b,)``."""
    return np.asarray([np.array_equal(r, ref) for r in rows], dtype=bool)


class ServerBlock:
    """Columns ``block`` of every client's state; ``strategy`` the run's."""

    def __init__(self, block: Block, num_clients: int, strategy: Strategy) -> None:
        self.block, self.num_clients, self.strategy = block, num_clients, strategy
        self.init: np.ndarray | None = None
        self.states: np.ndarray | None = None
        self._pending: dict[int, ClientUpdate] = {}
        self._inp: AggregationInput | None = None
        self.at_init = np.zeros(0, dtype=bool)  # (N,) rows equal to init
        self._ids: list[int] = []
        self._gate: tuple[dict[int, int], np.ndarray | None] = ({}, None)
        self.keep_last = False
        self.last_deltas: np.ndarray | None = None

    # -- state ------------------------------------------------------------------------------
    def initialize(self, init: np.ndarray) -> None:
        """``init`` ``(D_b,)`` (or the whole ``(D,)``, sliced here) for every client."""
        v = np.asarray(init, dtype=np.float32)
        if v.shape == (self.block.stop,) or v.shape[0] != self.block.size:
            v = v[self.block.cols]
        self.init = v.copy()
        self.states = np.tile(self.init, (self.num_clients, 1))
        self.at_init = np.ones(self.num_clients, dtype=bool)

    def load(self, states: np.ndarray, init: np.ndarray) -> None:
        """Restore ``states`` ``(N, D_b)`` and ``init`` ``(D_b,)``."""
        self.states = np.array(states, dtype=np.float32, copy=True)
        self.init = np.array(init, dtype=np.float32, copy=True)
        self.at_init = _row_is(self.states, self.init)

    def _set_rows(self, idx: Any, rows: np.ndarray) -> None:
        """``states[idx] = rows`` (``idx``: a client id or ids), keeping :attr:`at_init`
        (which clients' rows equal ``init``: no (N, D_b) scan per round) up to date."""
        assert self.states is not None and self.init is not None
        self.states[idx] = rows
        ids = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        self.at_init[ids] = _row_is(np.asarray(rows).reshape(len(ids), -1), self.init)

    def get_state(self, client_id: int) -> np.ndarray:
        """``(D_b,)`` float32 row of one client (a view)."""
        assert self.states is not None, "server not initialized"
        return self.states[client_id]

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"states": (N, D_b) f32, "init": (D_b,) f32}."""
        assert self.states is not None and self.init is not None
        return {"states": self.states, "init": self.init}

    # -- a round ----------------------------------------------------------------------------
    def receive(self, round_num: int, client_ids: list[int], updates: list[Any],
                send_gradient: bool = False) -> list[SliceReceipt]:
        """Fetch (refs) and check this block's slice of each update; keep those that pass."""
        self._pending, out = {}, []
        for cid, item in zip(client_ids, updates, strict=True):
            try:
                up = _fetch(item)
            except Exception as exc:  # noqa: BLE001 - a client failure is isolated
                from fedbip_ray.runtime.server import failure_reason

                out.append(SliceReceipt(int(cid), f"failed: {failure_reason(exc)}", None, 0))
                continue
            if not isinstance(up, ClientUpdate) or up.client_id != cid:
                out.append(SliceReceipt(int(cid), "failed: malformed update message", None, 0))
                continue
            out.append(self._check(up, round_num, send_gradient))
        return out

    def _check(self, up: ClientUpdate, round_num: int, send_gradient: bool) -> SliceReceipt:
        nbytes = int(np.asarray(up.vector).nbytes)
        if up.signal is not None:
            nbytes += int(np.asarray(up.signal).nbytes)
        try:
            vec = _checked_slice(up, round_num, self.num_clients, self.block)
            if send_gradient:
                _checked_signal(up, self.block)
        except UpdateRejected as exc:
            return SliceReceipt(up.client_id, str(exc), None, nbytes)
        if up.client_id in self._pending:
            return SliceReceipt(up.client_id, "duplicate update in this round", None, nbytes)
        self._pending[up.client_id] = up
        return SliceReceipt(up.client_id, None, param_sq_norms(vec, self.block.layout), nbytes,
                            up.num_examples, dict(up.metrics))

    def prepare(self, decision: Decision) -> BlockStats | None:
        """The block's aggregation input for the accepted clients (scaled, noised), and its
        statistics; None when the round does not aggregate."""
        assert self.states is not None and self.init is not None
        self._gate = ({}, None)
        pending, self._pending = self._pending, {}
        if not decision.aggregate:
            self._inp = None
            return None
        ids = list(decision.accepted)
        idx = np.asarray(ids, dtype=np.int64)
        deltas = np.stack([np.asarray(pending[c].vector, dtype=np.float32) for c in ids])
        if not np.all(decision.scale == 1.0):
            deltas *= decision.scale.astype(np.float32)[:, None]
        if decision.noise_std > 0:
            noise = block_noise(decision.noise_seed, len(ids), self.block.start, self.block.stop)
            noise *= np.float32(decision.noise_std)
            deltas += noise
        signals = None
        if self.strategy.client_options.send_gradient:
            signals = np.stack([np.asarray(pending[c].signal, dtype=np.float32) for c in ids])
        self._inp = AggregationInput(
            states=self.states[as_index(idx)], deltas=deltas, counts=decision.counts,
            layout=self.block.layout, init=self.init, signals=signals)
        self._ids = ids
        if self.keep_last:
            self.last_deltas = deltas
        inp = self._inp
        theta_init = np.asarray([np.array_equal(s + d, self.init)  # one row at a time
                                 for s, d in zip(inp.states, inp.deltas, strict=True)])
        return BlockStats(self.strategy.statistics(inp), self.at_init[idx].copy(), theta_init,
                          self.at_init.copy())

    def _stored(self, keep: tuple[int, ...]) -> np.ndarray:
        """``(len(keep), D_b)``: each kept client's trained state if it took part in this
        round, else its stored state."""
        assert self._inp is not None and self.states is not None
        rows = {c: k for k, c in enumerate(self._ids)}
        theta = self._inp.theta()
        return np.stack([theta[rows[c]] if c in rows else self.states[c] for c in keep]) \
            if keep else np.zeros((0, self.block.size), dtype=np.float32)

    def _join_input(self, join: JoinPlan) -> AggregationInput:
        assert self._inp is not None and self.init is not None
        rows = {c: k for k, c in enumerate(self._ids)}
        late = self._inp.deltas[[rows[c] for c in join.late]]
        n = len(join.keep) + len(join.late)
        return join_input(self._stored(join.keep), self.init, late, self.block.layout,
                          np.ones(n), None, self.strategy.client_options.send_gradient)

    def join_statistics(self, rp: RoundPlan) -> Any:
        """Statistics of the late joiners' join input on this block (None: no late joiner)."""
        if not rp.join.late or self._inp is None:
            return None
        return self.strategy.statistics(self._join_input(rp.join))

    def apply(self, rp: RoundPlan) -> BlockDone:
        """Set the participants' next states (and the late joiners' join aggregates); keep
        the trained states for the validation gate."""
        if rp.plan is None or self._inp is None:
            return BlockDone(0, True)
        assert self.states is not None
        inp, plan, join = self._inp, rp.plan, rp.join
        new = self.strategy.apply(inp, plan)
        if join.late and join.plan is not None:
            joined = self.strategy.apply(self._join_input(join), join.plan)
            rows = {c: k for k, c in enumerate(self._ids)}
            for j, c in enumerate(join.late):
                new[rows[c]] = joined[len(join.keep) + j]
        idx = np.asarray(self._ids, dtype=np.int64)
        opts = self.strategy.client_options
        keep = bool(opts.gate_mixes) or opts.ala is not None  # the clients' own trained states
        self._gate = ({c: k for k, c in enumerate(self._ids)}, inp.theta() if keep else None)
        self._inp = None
        finite = all_finite(new)
        if finite:
            self._set_rows(idx, new)
        return BlockDone(len(idx), finite)

    # -- validation gate --------------------------------------------------------------------
    def gate_local(self, client_id: int) -> np.ndarray:
        """``(D_b,)`` the client's own trained state this round (KeyError: none)."""
        rows, local = self._gate
        if local is None or client_id not in rows:
            raise KeyError(f"client {client_id} has no gate candidates this round")
        return local[rows[client_id]]

    def apply_gate(self, mixes: dict[int, float]) -> None:
        """``local + λ (aggregate − local)`` for each client's chosen ``λ``."""
        assert self.states is not None
        rows, local = self._gate
        for cid, lam in mixes.items():
            if local is None or cid not in rows or lam == 1.0:
                continue
            self._set_rows(cid, mix_candidates(local[rows[cid]], self.states[cid], [lam])[0])
        self._gate = ({}, None)

    # -- FedALA ---------------------------------------------------------------------------
    def apply_ala(self, round_num: int, client_ids: list[int], results: list[Any],
                  dim: int) -> list[int]:
        """Set each client's row to its :class:`ALAResult` state (or the result's ref; the
        whole adapter's ``(dim,)``) on this block's columns; one that failed or does not check
        out keeps its aggregate.
        Returns the clients set; drops the kept trained states."""
        assert self.states is not None
        done = []
        for cid, item in zip(client_ids, results, strict=True):
            res = ala_checked(item, cid, round_num, dim)
            if res is not None:
                self._set_rows(cid, res.state[self.block.cols])
                done.append(int(cid))
        self._gate = ({}, None)
        return done


def ala_checked(item: Any, client_id: int, round_num: int, dim: int) -> ALAResult | None:
    """``item`` (an :class:`ALAResult` or its ref) if it is this client's and round's with a
    finite float32 ``(dim,)`` state; None (logged) otherwise."""
    try:
        res = _fetch(item)
    except Exception as exc:  # noqa: BLE001 - a client failure is isolated
        log.warning("round %d: adaptive local aggregation of client %d failed (%s): aggregate "
                    "kept", round_num, client_id, type(exc).__name__)
        return None
    if res is None:
        return None
    ok = (isinstance(res, ALAResult) and res.client_id == client_id and res.round == round_num
          and isinstance(res.state, np.ndarray) and res.state.dtype == np.float32
          and res.state.shape == (dim,) and bool(np.isfinite(res.state).all()))
    if not ok:
        log.warning("round %d: malformed adaptive local aggregation result of client %d: "
                    "aggregate kept", round_num, client_id)
        return None
    return res


def all_finite(x: np.ndarray, block_rows: int = 64) -> bool:
    """``np.isfinite(x).all()`` for an (N, D) array without an N x D bool temporary."""
    return all(bool(np.isfinite(x[i:i + block_rows]).all()) for i in range(0, len(x), block_rows))


def _checked_slice(up: ClientUpdate, round_num: int, num_clients: int,
                   block: Block) -> np.ndarray:
    """The update's slice for ``block`` once round, id, count, layout and values check out
    (:func:`~fedbip_ray.core.validation.validate_update`; the norm bound needs every block and
    is the coordinator's)."""
    if up.round != round_num:
        raise UpdateRejected(f"update is for round {up.round}, expected {round_num}")
    if not 0 <= up.client_id < num_clients:
        raise UpdateRejected(f"unknown client id {up.client_id}")
    if up.num_examples <= 0:
        raise UpdateRejected(f"num_examples must be positive, got {up.num_examples}")
    if not isinstance(up.layout, Layout):
        raise UpdateRejected(f"update layout is a {type(up.layout).__name__}, not a Layout")
    return validate_update(up.vector, up.layout, block.layout)[0]


def _checked_signal(up: ClientUpdate, block: Block) -> None:
    """UpdateRejected unless the update carries a valid gradient signal for ``block``."""
    if up.signal is None:
        raise UpdateRejected("the strategy compares gradients but the update has no "
                             "gradient signal")
    try:
        validate_update(up.signal, block.layout, block.layout)
    except UpdateRejected as exc:
        raise UpdateRejected(f"gradient signal: {exc}") from None


@ray.remote(max_restarts=0)
class BlockActor(ServerBlock):
    """A :class:`ServerBlock` as a Ray actor (one shard of a sharded server); ``threads``: its
    BLAS threads (``resources.server_cpus``)."""

    def __init__(self, block: Block, num_clients: int, strategy: Strategy,
                 threads: int = 1) -> None:
        self.threads = set_blas_threads(threads)
        super().__init__(block, num_clients, strategy)

    def get_state(self, client_id: int) -> np.ndarray:
        return super().get_state(client_id)

