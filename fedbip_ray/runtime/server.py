"""Server: per-client personalized states + core aggregation. ``ServerActor`` is its Ray shell.

The driver hands the server the clients' update ObjectRefs as they are (nested in a list, not
fetched); the server fetches each one itself, so one failed client cannot fail the others.
Every update is validated (layout, finiteness, norm; :mod:`.update_checks`) before it can reach
aggregation; with ``privacy`` set, each accepted task vector is clipped and Gaussian noise is
added (:class:`GaussianNoiseStrategy`, seeded per round so a resumed run draws the same noise).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray

from fedbip_ray.core.aggregate import as_index
from fedbip_ray.core.gate import mix_candidates
from fedbip_ray.core.grouping import group_recovery
from fedbip_ray.core.join import informed_rows, join_aggregate, personalizes_by_similarity
from fedbip_ray.core.strategies import (
    AggregationInput,
    GaussianNoiseStrategy,
)
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import (
    FULL_MATRIX_MAX,
    AggregationReport,
    ClientUpdate,
    MatrixSummary,
    ServerSettings,
)
from fedbip_ray.runtime.outputs import write_round_matrices
from fedbip_ray.runtime.threads import blas_threads, set_blas_threads
from fedbip_ray.runtime.update_checks import ValidatedUpdates, validate_updates

log = logging.getLogger("fedbip.server")


class FederatedServer:
    """Holds ``states`` (num_clients, D) float32: each client's personalized adapter.

    ``settings.groups`` (num_clients,) are the true groups when known (oracle strategy,
    diagnostics); ``settings.privacy`` turns on client-level DP; ``settings.seed`` seeds the
    per-round DP noise.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.strategy = settings.strategy
        self.num_clients = settings.num_clients
        self.groups = (np.asarray(settings.groups, dtype=np.int64)
                       if settings.groups is not None else None)
        self.max_norm, self.on_excess_norm = settings.max_norm, settings.on_excess_norm
        self.privacy, self.seed = settings.privacy, settings.seed
        self.output, self.top_k = settings.output, settings.top_k
        self.layout: Layout | None = None
        self.init: np.ndarray | None = None
        self.states: np.ndarray | None = None
        # (num_clients, num_clients) smoothed, NaN unknown
        self.similarity: np.ndarray | None = None
        self.memory: np.ndarray | None = None  # (num_clients, M) f64 strategy memory, NaN: none yet
        # this round's own-training states for the validation gate: ({client: row}, (N_t, D))
        self._gate_local: tuple[dict[int, int], np.ndarray | None] = ({}, None)
        self.keep_last = False
        self._last: dict[str, Any] | None = None

    # -- state ------------------------------------------------------------------------------
    def initialize(self, init: np.ndarray, layout: Layout) -> int:
        """Every client starts from the same initial adapter ``init`` (D,). Returns D."""
        self.layout = layout
        self.init = np.asarray(init, dtype=np.float32).copy()
        self.states = np.tile(self.init, (self.num_clients, 1))
        self.similarity = np.full((self.num_clients, self.num_clients), np.nan)
        return self.layout.size

    def get_state(self, client_id: int) -> np.ndarray:
        """(D,) float32 personalized state of one client."""
        assert self.states is not None, "server not initialized"
        return self.states[client_id].copy()

    def all_states(self) -> np.ndarray:
        assert self.states is not None
        return self.states

    # -- aggregation ------------------------------------------------------------------------
    def noise(self, round_num: int) -> GaussianNoiseStrategy | None:
        """Round ``round_num``'s DP clip + noise around the configured strategy (None: off)."""
        if not self.privacy:
            return None
        return GaussianNoiseStrategy(self.strategy, clip=self.privacy.clip_norm,
                                     noise_multiplier=self.privacy.noise_multiplier,
                                     seed=noise_seed(self.seed, round_num))

    def _validated(self, round_num: int, updates: list[ClientUpdate]) -> ValidatedUpdates:
        """Check every update (:func:`~fedbip_ray.runtime.update_checks.validate_updates`)."""
        assert self.layout is not None
        return validate_updates(updates, round_num, self.num_clients, self.layout,
                                self.max_norm, self.on_excess_norm,
                                self.strategy.client_options.send_gradient)

    def _input(self, v: ValidatedUpdates) -> AggregationInput:
        """The strategy's input for the accepted clients ``v.ids`` (N_t of them)."""
        assert self.states is not None and self.layout is not None
        idx = np.asarray(v.ids, dtype=np.int64)
        prev = self.similarity[np.ix_(idx, idx)] if self.similarity is not None else None
        if prev is not None and np.isnan(prev).any():
            prev = None
        return AggregationInput(
            states=self.states[as_index(idx)],  # a view when the participants are contiguous
            deltas=np.stack(v.vecs).astype(np.float32, copy=False),
            counts=np.asarray([u.num_examples for u in v.accepted], dtype=np.int64),
            layout=self.layout, init=self.init,
            groups=self.groups[idx] if self.groups is not None else None, prev_similarity=prev,
            signals=np.stack(v.signals) if v.signals else None,
            memory=self.memory[idx] if self.memory is not None else None,
        )

    def aggregate(self, round_num: int, updates: list[ClientUpdate],
                  min_accepted: int = 1) -> AggregationReport:
        """Validate ``updates`` and apply the strategy to the clients that sent a valid one.

        With fewer than ``min_accepted`` valid updates the aggregation is skipped and every
        state is kept (``report.aggregated`` is False). The report holds accepted/rejected
        client ids, the similarity and weight matrices (accepted x accepted; up to
        ``FULL_MATRIX_MAX`` of them), their bounded summary and the bytes received.
        """
        assert self.states is not None and self.layout is not None
        self._gate_local = ({}, None)
        v = self._validated(round_num, updates)
        report = AggregationReport(
            round=round_num, accepted=v.ids, rejected=v.rejected, modified=v.modified,
            bytes_in=v.nbytes,
            train_losses=[float(u.metrics.get("train_loss", float("nan"))) for u in v.accepted],
            **training_totals(v.accepted))
        if not v.ids or len(v.ids) < min_accepted:
            log.warning("round %d: %d valid updates, %d needed: aggregation skipped, states kept",
                        round_num, len(v.ids), min_accepted)
            return report
        inp = self._input(v)
        noise = self.noise(round_num)
        if noise is not None:  # from here on only noised task vectors exist on the server
            inp = noise.privatize(inp)
            report.modified = list(v.ids)  # gate candidates: the noised local states, sent
        result = self.strategy.aggregate(inp)
        if not all_finite(result.states):
            raise FloatingPointError(f"round {round_num}: aggregation produced non-finite states")
        idx = np.asarray(v.ids, dtype=np.int64)
        self._gate_local = ({c: k for k, c in enumerate(v.ids)}, inp.theta()
                            if self.strategy.client_options.gate_mixes else None)
        self.states[idx] = self._with_late_joins(round_num, v.ids, inp, result.states)
        self.remember(idx, result.memory)
        report.aggregated = True
        if result.similarity is not None and self.similarity is not None:
            self.similarity[np.ix_(idx, idx)] = result.similarity
        self._report_matrices(report, result.similarity, result.weights)
        report.diagnostics = self._diagnostics(idx, result)
        if self.keep_last:
            self._last = {"round": round_num, "clients": list(v.ids), "deltas": inp.deltas}
        return report

    def _report_matrices(self, report: AggregationReport, similarity: np.ndarray | None,
                         weights: np.ndarray) -> None:
        """Write the round's (N_t, N_t) matrices to ``similarity/round_XXXXX.npz`` at the
        output (when set) and put their bounded summary into ``report``; the matrices
        themselves only up to ``FULL_MATRIX_MAX`` participants."""
        ids = report.accepted
        file = None
        if self.output is not None:
            file = write_round_matrices(self.output, report.round, ids, similarity, weights)
        if len(ids) <= FULL_MATRIX_MAX:
            if similarity is not None:
                report.similarity = np.asarray(similarity, dtype=np.float64)
            report.weights = np.asarray(weights, dtype=np.float64)
        groups = self.groups[np.asarray(ids, dtype=np.int64)] if self.groups is not None else None
        report.summary = MatrixSummary.of(ids, similarity, weights, self.top_k, groups, file)

    def _late_rows(self, ids: list[int]) -> list[int]:
        """Rows (into ``ids``) of participants taking part for the first time (state still
        ``init``) while some client already holds a trained state; empty for strategies that
        do not weigh clients by similarity."""
        assert self.states is not None and self.init is not None
        if not personalizes_by_similarity(self.strategy):
            return []
        fresh = [k for k, c in enumerate(ids) if np.array_equal(self.states[c], self.init)]
        if not fresh or not informed_rows(self.states, self.init).any():
            return []
        return fresh

    def _with_late_joins(self, round_num: int, ids: list[int], inp: AggregationInput,
                         states: np.ndarray) -> np.ndarray:
        """``states`` (N_t, D) with each late joiner's row replaced by its join aggregate
        (:func:`fedbip_ray.core.join.join_aggregate`): the strategy over every other client's
        cumulative vector (co-participants: after this round's training) and the late joiners'
        first task vectors, so that it learns from all clients like it, not only from this
        round's co-participants (late joiners of one round join together, in one strategy
        call). Without late joiners ``states`` is returned as is."""
        late = self._late_rows(ids)
        if not late:
            return states
        assert self.states is not None and self.init is not None and self.layout is not None
        rows = {c: k for k, c in enumerate(ids)}
        late_ids = {ids[k] for k in late}
        theta = inp.theta()
        others = [c for c in range(self.num_clients) if c not in late_ids]
        stored = np.stack([theta[rows[c]] if c in rows else self.states[c] for c in others])
        joined = join_aggregate(self.strategy, stored, self.init, inp.deltas[late], self.layout,
                                np.ones(len(others)), np.ones(len(late)), together=True)
        out = np.array(states, dtype=np.float32, copy=True)
        for k, res in zip(late, joined, strict=True):
            out[k] = res.state
        log.info("round %d: clients %s joined late: aggregated over every client's cumulative "
                 "vector", round_num, sorted(late_ids))
        return out

    def _diagnostics(self, idx: np.ndarray, result: Any) -> dict[str, float]:
        """Group recovery of this round's similarity/weights when the true groups are known
        (benchmarks): in-group weight share, in/cross-group similarity, adjusted Rand index."""
        if self.groups is None or result.similarity is None:
            return {}
        g = self.groups[idx]
        if len(np.unique(g)) < 2 or len(g) < 3:
            return {}
        rec = group_recovery(np.asarray(result.similarity), np.asarray(result.weights), g)
        return {k: float(v) for k, v in rec.items() if v == v}

    # -- validation gate (fedbip_ray.core.gate) --------------------------------------------
    def gate_local(self, client_id: int) -> np.ndarray:
        """(D,) float32: the client's own state after this round's training (its start state
        plus its validated task vector, clipped and noised under DP); its aggregate is
        :meth:`get_state` until :meth:`apply_gate`."""
        rows, local = self._gate_local
        if local is None or client_id not in rows:
            raise KeyError(f"client {client_id} has no gate candidates this round")
        return local[rows[client_id]].copy()

    def apply_gate(self, mixes: dict[int, float]) -> dict[int, float]:
        """Set each client's state to ``local + λ (aggregate − local)`` for its chosen ``λ``
        and drop the stored local states. Returns the ``λ`` applied per client."""
        assert self.states is not None
        rows, local = self._gate_local
        applied: dict[int, float] = {}
        for cid, lam in mixes.items():
            if local is None or cid not in rows or lam == 1.0:
                continue
            self.states[cid] = mix_candidates(local[rows[cid]], self.states[cid], [lam])[0]
            applied[int(cid)] = float(lam)
        self._gate_local = ({}, None)
        return applied

    def keep_last_round(self, keep: bool = True) -> None:
        """Keep each aggregation's stacked task vectors until the next one (N_t x D float32
        between rounds) so that :meth:`last_round` can return them; off by default."""
        self.keep_last = keep
        if not keep:
            self._last = None

    def last_round(self) -> dict[str, Any] | None:
        """The accepted, validated task vectors of the latest aggregation (noised under DP):
        {"round", "clients", "deltas": (N_t, D) float32} when :meth:`keep_last_round` is on
        (replay tuning); None otherwise."""
        return self._last

    # -- checkpoints (the driver writes them: safetensors + JSON, never pickle) -------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], Layout]:
        """({"states": (N, D) f32, "init": (D,) f32, "similarity": (N, N) f64}, layout)."""
        assert self.states is not None and self.init is not None and self.layout is not None
        tensors = {"states": self.states, "init": self.init}
        if self.similarity is not None:
            tensors["similarity"] = self.similarity.astype(np.float64)
        if self.memory is not None:
            tensors["memory"] = self.memory
        return tensors, self.layout

    def load_state_dict(self, tensors: dict[str, np.ndarray], lay: Layout) -> int:
        """Restore what :meth:`state_dict` returned (shapes checked). Returns D."""
        states = np.asarray(tensors["states"], dtype=np.float32)
        if states.shape != (self.num_clients, lay.size):
            raise ValueError(f"checkpoint holds states {states.shape}, run needs "
                             f"({self.num_clients}, {lay.size})")
        self.layout, self.states = lay, states.copy()
        self.init = np.asarray(tensors["init"], dtype=np.float32).copy()
        sim = tensors.get("similarity")
        self.similarity = (np.asarray(sim, dtype=np.float64).copy() if sim is not None
                           else np.full((self.num_clients, self.num_clients), np.nan))
        memory = tensors.get("memory")
        self.memory = np.asarray(memory, dtype=np.float64).copy() if memory is not None else None
        return lay.size

    def remember(self, idx: np.ndarray, memory: np.ndarray | None) -> None:
        """Keep the strategy's (N_t, M) memory rows of the participants ``idx`` for the next
        round each takes part in (FedAWA's logits); other clients keep theirs."""
        if memory is None:
            return
        mem = np.asarray(memory, dtype=np.float64)
        if self.memory is None or self.memory.shape[1] != mem.shape[1]:
            self.memory = np.full((self.num_clients, mem.shape[1]), np.nan)
        self.memory[idx] = mem


def all_finite(x: np.ndarray, block_rows: int = 64) -> bool:
    """``np.isfinite(x).all()`` for an (N, D) array without an N x D bool temporary."""
    return all(bool(np.isfinite(x[i:i + block_rows]).all()) for i in range(0, len(x), block_rows))


def training_totals(updates: list[ClientUpdate]) -> dict[str, float]:
    """Local training cost of a round's accepted updates: summed ``train_seconds`` and
    ``steps``, and the largest client peak memory (``peak_rss_mib``) reported."""
    def total(key: str) -> float:
        return float(sum(float(u.metrics.get(key, 0.0) or 0.0) for u in updates))

    peaks = [float(u.metrics["peak_rss_mib"]) for u in updates if "peak_rss_mib" in u.metrics]
    return {"train_seconds": total("train_seconds"), "train_steps": total("steps"),
            "client_peak_rss_mib": max(peaks) if peaks else float("nan")}


def noise_seed(seed: int, round_num: int) -> int:
    """Seed of round ``round_num``'s DP noise: a pure function of (run seed, round)."""
    return int(np.random.SeedSequence([seed, round_num, 0xD9]).generate_state(1)[0])


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
        assert self.states is not None, "server not initialized"
        return self.states[client_id]

    def aggregate_refs(self, round_num: int, client_ids: list[int], refs: list[Any],
                       min_accepted: int = 1) -> AggregationReport:
        """``refs`` are ObjectRefs of :class:`ClientUpdate`; failures are reported, not raised."""
        updates, failed = [], {}
        for cid, ref in zip(client_ids, refs, strict=True):
            try:
                up = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any client failure is isolated
                failed[int(cid)] = failure_reason(exc)
                log.warning("round %d: client %d failed: %s", round_num, cid, failed[int(cid)])
                continue
            if not isinstance(up, ClientUpdate) or up.client_id != cid:
                failed[int(cid)] = "malformed update message"
                continue
            updates.append(up)
        report = self.aggregate(round_num, updates, min_accepted)
        report.failed = failed
        return report


def failure_reason(exc: BaseException) -> str:
    """``"Type: first line"`` of a client failure (a task error is named by its cause)."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]
