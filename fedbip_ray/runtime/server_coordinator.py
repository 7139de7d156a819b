"""The server's coordinator: the decisions of a round that need every column, taken from the
blocks' small summaries (:mod:`.server_block`), never from ``(N, D)`` arrays.

Per round: :meth:`Coordinator.decide` turns the blocks' receipts into accepted/rejected
updates (norm bounds from per-parameter squared norms, DP clipping and the noise seed),
:meth:`Coordinator.plan` combines the blocks' statistics into the strategy's weights (and
finds late joiners), :meth:`Coordinator.join_plan` the late joiners' weights, and
:meth:`Coordinator.finish` keeps the similarity and the strategy's memory and writes the
round's report. :class:`CoordinatorActor` is its Ray shell.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from fedbip_ray.core.blocks import combine, row_norms
from fedbip_ray.core.grouping import group_recovery
from fedbip_ray.core.interface import Plan, RoundMeta
from fedbip_ray.core.join import personalizes_by_similarity
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.runtime.messages import (
    FULL_MATRIX_MAX,
    AggregationReport,
    MatrixSummary,
    ServerSettings,
)
from fedbip_ray.runtime.outputs import write_round_matrices
from fedbip_ray.runtime.server_block import (
    BlockDone,
    BlockStats,
    Decision,
    JoinPlan,
    RoundPlan,
    SliceReceipt,
)

log = logging.getLogger("fedbip.server")


def noise_seed(seed: int, round_num: int) -> int:
    """Seed of round ``round_num``'s DP noise: a pure function of (run seed, round)."""
    return int(np.random.SeedSequence([seed, round_num, 0xD9]).generate_state(1)[0])


def training_totals(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    """Local training cost of a round's accepted updates: summed ``train_seconds`` and
    ``steps``, and the largest client peak memory (``peak_rss_mib``) reported."""
    def total(key: str) -> float:
        return float(sum(float(m.get(key, 0.0) or 0.0) for m in metrics))

    peaks = [float(m["peak_rss_mib"]) for m in metrics if "peak_rss_mib" in m]
    return {"train_seconds": total("train_seconds"), "train_steps": total("steps"),
            "client_peak_rss_mib": max(peaks) if peaks else float("nan")}


class Coordinator:
    """Holds what is ``N x N`` or smaller: ``similarity`` (N, N) f64 (NaN unknown), the
    strategy's ``memory`` (N, M) f64, the true ``groups``; ``layout`` the whole adapter's."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.strategy = settings.strategy
        self.num_clients = settings.num_clients
        self.groups = (np.asarray(settings.groups, dtype=np.int64)
                       if settings.groups is not None else None)
        self.layout: Layout | None = None
        self.similarity: np.ndarray | None = None
        self.memory: np.ndarray | None = None
        self._report: AggregationReport | None = None
        self._decision: Decision | None = None
        self._plan: RoundPlan | None = None

    def initialize(self, layout: Layout) -> None:
        self.layout = layout
        self.similarity = np.full((self.num_clients, self.num_clients), np.nan)

    def load(self, layout: Layout, similarity: np.ndarray | None,
             memory: np.ndarray | None) -> None:
        self.layout = layout
        self.similarity = (np.asarray(similarity, dtype=np.float64).copy()
                           if similarity is not None
                           else np.full((self.num_clients, self.num_clients), np.nan))
        self.memory = np.asarray(memory, dtype=np.float64).copy() if memory is not None else None

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"similarity": (N, N) f64, "memory": (N, M) f64 (when the strategy keeps one)}."""
        out: dict[str, np.ndarray] = {}
        if self.similarity is not None:
            out["similarity"] = self.similarity.astype(np.float64)
        if self.memory is not None:
            out["memory"] = self.memory
        return out

    # -- decide -----------------------------------------------------------------------------
    def decide(self, round_num: int, min_accepted: int,
               *receipts: list[SliceReceipt]) -> Decision:
        """Accept or reject each update from every block's receipt of it (the first block's
        reason wins), bound its norm, set the DP clipping and noise."""
        s = self.settings
        report = AggregationReport(round=round_num)
        accepted: list[int] = []
        norms: list[float] = []
        counts: list[int] = []
        metrics: list[dict[str, float]] = []
        for parts in zip(*receipts, strict=True):
            cid = parts[0].client_id
            report.bytes_in += sum(p.nbytes for p in parts)
            reason = next((p.reason for p in parts if p.reason is not None), None)
            if reason is None and cid in accepted:
                reason = "duplicate update in this round"
            if reason is not None and reason.startswith("failed: "):
                report.failed[cid] = reason[len("failed: "):]
                log.warning("round %d: client %d failed: %s", round_num, cid, report.failed[cid])
                continue
            norm = float(row_norms(np.concatenate([p.sq_norms for p in parts]))) \
                if reason is None else 0.0
            if reason is None and s.max_norm is not None and norm > s.max_norm \
                    and s.on_excess_norm == "reject":
                reason = f"update norm {norm:.6g} exceeds the bound {s.max_norm:.6g}"
            if reason is not None:
                report.rejected[cid] = reason
                log.warning("round %d: rejected update of client %s: %s", round_num, cid, reason)
                continue
            accepted.append(cid)
            norms.append(norm)
            counts.append(parts[0].num_examples)
            metrics.append(parts[0].metrics or {})
        scale = np.ones(len(accepted))
        norm_arr = np.asarray(norms, dtype=np.float64)
        if s.max_norm is not None:
            over = norm_arr > s.max_norm
            scale[over] = s.max_norm / norm_arr[over]
            report.modified = [c for c, o in zip(accepted, over, strict=True) if o]
        std, seed = 0.0, 0
        if s.privacy:
            clipped = norm_arr * scale
            over = clipped > s.privacy.clip_norm
            scale[over] *= s.privacy.clip_norm / clipped[over]
            std = s.privacy.noise_multiplier * s.privacy.clip_norm
            seed = noise_seed(s.seed, round_num)
        report.accepted = accepted
        report.train_losses = [float(m.get("train_loss", float("nan"))) for m in metrics]
        for key, value in training_totals(metrics).items():
            setattr(report, key, value)
        go = bool(accepted) and len(accepted) >= min_accepted
        if not go:
            log.warning("round %d: %d valid updates, %d needed: aggregation skipped, states kept",
                        round_num, len(accepted), min_accepted)
        elif s.privacy:  # only noised task vectors exist from here on: the gate sends them
            report.modified = list(accepted)
        self._report = report
        self._decision = Decision(round_num, tuple(accepted), scale,
                                  np.asarray(counts, dtype=np.int64), float(std), seed, go)
        return self._decision

    # -- plan -------------------------------------------------------------------------------
    def _meta(self, idx: np.ndarray, counts: np.ndarray) -> RoundMeta:
        assert self.layout is not None
        prev = self.similarity[np.ix_(idx, idx)] if self.similarity is not None else None
        if prev is not None and np.isnan(prev).any():
            prev = None
        return RoundMeta(len(idx), counts, self.layout,
                         self.groups[idx] if self.groups is not None else None, prev,
                         self.memory[idx] if self.memory is not None else None)

    def plan(self, *block_stats: BlockStats | None) -> RoundPlan:
        """The round's plan from the blocks' statistics, and its late joiners."""
        d = self._decision
        assert d is not None
        if not d.aggregate or any(b is None for b in block_stats):
            self._plan = RoundPlan(None)
            return self._plan
        stats = [b for b in block_stats if b is not None]
        idx = np.asarray(d.accepted, dtype=np.int64)
        plan = self.strategy.plan(combine([b.stats for b in stats]), self._meta(idx, d.counts))
        self._plan = RoundPlan(plan, self._late(d.accepted, stats))
        return self._plan

    def _late(self, ids: tuple[int, ...], stats: list[BlockStats]) -> JoinPlan:
        """First-time participants (state still ``init`` on every block) while some client
        holds a trained state, for the strategies that weigh by similarity."""
        if not personalizes_by_similarity(self.strategy):
            return JoinPlan()
        fresh = np.logical_and.reduce([b.fresh for b in stats])
        state_init = np.logical_and.reduce([b.state_init for b in stats])
        if not fresh.any() or state_init.all():
            return JoinPlan()
        theta_init = np.logical_and.reduce([b.theta_init for b in stats])
        late = [c for c, f in zip(ids, fresh, strict=True) if f]
        rows = {c: k for k, c in enumerate(ids)}
        keep = [c for c in range(self.num_clients) if c not in set(late)
                and not (theta_init[rows[c]] if c in rows else state_init[c])]
        return JoinPlan(tuple(keep), tuple(late))

    def join_plan(self, *block_stats: Any) -> RoundPlan:
        """The round plan with its late joiners' join plan (every row starts from ``init``,
        all counts 1: the join over every other client's cumulative vector)."""
        rp = self._plan
        assert rp is not None and self.layout is not None
        if rp.plan is None or not rp.join.late:
            return rp
        n = len(rp.join.keep) + len(rp.join.late)
        meta = RoundMeta(n, np.ones(n), self.layout)
        self._plan = replace(rp, join=replace(rp.join, plan=self.strategy.plan(
            combine(list(block_stats)), meta)))
        log.info("round %d: clients %s joined late: aggregated over every client's cumulative "
                 "vector", self._report.round if self._report else -1, sorted(rp.join.late))
        return self._plan

    # -- finish -----------------------------------------------------------------------------
    def finish(self, *done: BlockDone) -> AggregationReport:
        """Keep the round's similarity and memory; the report with its bounded matrices."""
        report, rp = self._report, self._plan
        assert report is not None and rp is not None
        self._report = self._decision = self._plan = None
        if rp.plan is None:
            return report
        if not all(b.finite for b in done):
            raise FloatingPointError(f"round {report.round}: aggregation produced non-finite "
                                     "states")
        plan = rp.plan
        idx = np.asarray(report.accepted, dtype=np.int64)
        self.remember(idx, plan.memory)
        report.aggregated = True
        if plan.similarity is not None and self.similarity is not None:
            self.similarity[np.ix_(idx, idx)] = plan.similarity
        self._report_matrices(report, plan)
        report.diagnostics = self._diagnostics(idx, plan)
        return report

    def remember(self, idx: np.ndarray, memory: np.ndarray | None) -> None:
        """Keep the strategy's (N_t, M) memory rows of the participants ``idx``."""
        if memory is None:
            return
        mem = np.asarray(memory, dtype=np.float64)
        if self.memory is None or self.memory.shape[1] != mem.shape[1]:
            self.memory = np.full((self.num_clients, mem.shape[1]), np.nan)
        self.memory[idx] = mem

    # -- FedALA ---------------------------------------------------------------------------
    def ala_weights(self, client_id: int) -> np.ndarray | None:
        """(P,) float32 the client's learned FedALA weights (None: none yet)."""
        if self.memory is None or np.isnan(self.memory[client_id]).all():
            return None
        return self.memory[client_id].astype(np.float32)

    def remember_ala(self, round_num: int, client_ids: list[int], results: list[Any]) -> None:
        """Keep the FedALA weights of each result that checks out (see :func:`ala_checked`)."""
        from fedbip_ray.runtime.server_block import ala_checked

        assert self.layout is not None
        rows, idx = [], []
        for cid, item in zip(client_ids, results, strict=True):
            res = ala_checked(item, cid, round_num, self.layout.size)
            if res is not None and res.weights is not None:
                rows.append(np.asarray(res.weights, dtype=np.float64))
                idx.append(int(cid))
        if rows:
            self.remember(np.asarray(idx, dtype=np.int64), np.stack(rows))

    def _report_matrices(self, report: AggregationReport, plan: Plan) -> None:
        """Write the (N_t, N_t) matrices to the output (when set); put them into ``report``
        up to ``FULL_MATRIX_MAX`` participants, their bounded summary always."""
        ids, out = report.accepted, self.settings.output
        file = (write_round_matrices(out, report.round, ids, plan.similarity, plan.weights)
                if out is not None else None)
        if len(ids) <= FULL_MATRIX_MAX:
            if plan.similarity is not None:
                report.similarity = np.asarray(plan.similarity, dtype=np.float64)
            report.weights = np.asarray(plan.weights, dtype=np.float64)
        groups = self.groups[np.asarray(ids, dtype=np.int64)] if self.groups is not None else None
        report.summary = MatrixSummary.of(ids, plan.similarity, plan.weights,
                                          self.settings.top_k, groups, file)

    def _diagnostics(self, idx: np.ndarray, plan: Plan) -> dict[str, float]:
        """Group recovery of the round's similarity/weights when the true groups are known."""
        if self.groups is None or plan.similarity is None:
            return {}
        g = self.groups[idx]
        if len(np.unique(g)) < 2 or len(g) < 3:
            return {}
        rec = group_recovery(np.asarray(plan.similarity), np.asarray(plan.weights), g)
        return {k: float(v) for k, v in rec.items() if v == v}


@ray.remote(max_restarts=0)
class CoordinatorActor(Coordinator):
    """The :class:`Coordinator` of a sharded server as a Ray actor."""
