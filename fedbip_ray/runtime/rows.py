"""Pure pieces of the round loop (no Ray): client sampling, metric rows, summaries and the
progress text. A metrics.jsonl row is a plain JSON object (see README, Outputs)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedbip_ray.config import Config
from fedbip_ray.privacy.accounting import privacy_report
from fedbip_ray.runtime.messages import AggregationReport

Row = dict[str, Any]  # one metrics.jsonl object


def sample_clients(num_clients: int, k: int, seed: int, round_num: int) -> list[int]:
    """Seeded, stateless sampling of ``k`` client ids for a round (sorted)."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_num])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def worst_fraction_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the lowest ``fraction`` of values (at least one)."""
    v = np.sort(np.asarray([x for x in values if x == x], dtype=np.float64))
    if len(v) == 0:
        return math.nan
    return float(v[: max(1, math.ceil(fraction * len(v)))].mean())


def min_reports(fraction: float, participants: int) -> int:
    """Valid updates a round needs before it aggregates (at least one)."""
    return max(1, math.ceil(fraction * participants - 1e-9))


class PhaseClock:
    """Wall seconds of a round's phases: each :meth:`lap` records the time since the last one."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self._last
        self._last = now


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _str_keys(d: dict[int, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()}


def round_extra(report: AggregationReport, eval_failed: dict[int, str], actors_replaced: int,
                privacy: dict[str, Any] | None) -> dict[str, float]:
    """The ``extra`` block of a row: the round's cost, fault counters and diagnostics."""
    extra: dict[str, float] = {"aggregation_skipped": float(not report.aggregated),
                               "clients_eval_failed": float(len(eval_failed)),
                               "actors_replaced": float(actors_replaced)}
    if privacy is not None and privacy.get("epsilon") is not None:
        extra["dp_epsilon"] = float(privacy["epsilon"])
    if report.train_steps:
        extra["train_step_seconds"] = float(report.train_seconds) / float(report.train_steps)
    if report.client_peak_rss_mib == report.client_peak_rss_mib:
        extra["client_peak_rss_mib"] = float(report.client_peak_rss_mib)
    for phase, secs in report.phase_seconds.items():
        extra[f"{phase}_seconds"] = float(secs)
    if report.gate:
        mixes = list(report.gate.values())
        extra["gate_locals_sent"] = float(report.gate_locals_sent)
        extra["gate_mean_mix"] = float(np.mean(mixes))
        extra["gate_local_fraction"] = float(np.mean([m == 0.0 for m in mixes]))
    for key, value in report.diagnostics.items():
        extra[f"group_{key}"] = float(value)  # group recovery (true groups known)
    return extra


def per_task_means(evals: dict[int, dict[str, dict]], split: str) -> dict[str, float]:
    """{task: mean over the clients that hold the task of their ``split`` score on it}, from
    each client's ``per_task`` scores (causal LMs with tasks); {} when no client has tasks."""
    by_task: dict[str, list[float]] = {}
    for _, e in sorted(evals.items()):
        for task, score in (e.get(split, {}).get("per_task") or {}).items():
            if score == score:
                by_task.setdefault(str(task), []).append(float(score))
    return {t: float(np.mean(v)) for t, v in sorted(by_task.items())}


def round_row(round_num: int, evals: dict[int, dict[str, dict]], report: AggregationReport,
              participants: list[int], stragglers: list[int], seconds: float,
              eval_failed: dict[int, str] | None = None, actors_replaced: int = 0,
              privacy: dict[str, Any] | None = None,
              placement: dict[str, str] | None = None) -> Row:
    """One metrics.jsonl row (see README, Outputs and Guarantees). ``evals`` maps a client
    to its ``{"val": {...}, "test": {...}}`` scores; ``placement`` each fitted client's
    ``node_id/device`` (cluster.describe_where)."""
    acc = {c: e["test"]["accuracy"] for c, e in sorted(evals.items())}
    val = {c: e["val"]["accuracy"] for c, e in sorted(evals.items())}
    values = [a for a in acc.values() if a == a]
    vvals = [a for a in val.values() if a == a]
    losses = [v for v in report.train_losses if v is not None and v == v]
    eval_failed = eval_failed or {}
    row: Row = {
        "round": round_num,
        "mean_accuracy": _mean(values),
        "std_accuracy": float(np.std(values)) if values else None,
        "worst10_accuracy": worst_fraction_mean(values) if values else None,
        "mean_val_accuracy": _mean(vvals),
        "per_client_accuracy": _str_keys(acc),
        "per_client_val_accuracy": _str_keys(val),
        "test_loss": _mean([e["test"]["loss"] for _, e in sorted(evals.items())]),
        "train_loss": _mean(losses),
        "participants": participants,
        "accepted": report.accepted,
        "rejected": _str_keys(report.rejected),
        "failed": _str_keys(report.failed),
        "stragglers": stragglers,
        "aggregated": report.aggregated,
        "eval_failed": _str_keys(eval_failed),
        "bytes_in": report.bytes_in,
        "bytes_out": report.bytes_out,
        "seconds": seconds,
        "extra": round_extra(report, eval_failed, actors_replaced, privacy),
    }
    if report.gate:
        row["gate_mix"] = {str(c): m for c, m in sorted(report.gate.items())}
    if report.gate_scores:  # [accuracy, n, loss, loss_sd] per mix, read back by the gate
        row["gate_scores"] = {str(c): [[_finite(x.get("accuracy")), float(x.get("n", 0) or 0),
                                        _finite(x.get("loss")), _finite(x.get("loss_sd"))]
                                       for x in s]
                              for c, s in sorted(report.gate_scores.items())}
    if privacy is not None:
        row["privacy"] = privacy
    if placement:
        row["placement"] = placement
    tasks_val, tasks_test = per_task_means(evals, "val"), per_task_means(evals, "test")
    if tasks_val or tasks_test:
        row["per_task_val_score"] = tasks_val
        row["per_task_score"] = tasks_test
    return row


def fault_totals(history: Sequence[Row]) -> dict[str, int]:
    """Counts of every fault event over ``history`` (summary.json ``faults``)."""
    return {
        "failed": sum(len(r.get("failed", {})) for r in history),
        "stragglers": sum(len(r.get("stragglers", [])) for r in history),
        "rejected": sum(len(r.get("rejected", {})) for r in history),
        "eval_failed": sum(len(r.get("eval_failed", {})) for r in history),
        "rounds_not_aggregated": sum(1 for r in history if not r.get("aggregated", True)),
        "actors_replaced": int(sum(r.get("extra", {}).get("actors_replaced", 0) for r in history)),
    }


def summarize(cfg: Config, history: list[Row], wall_seconds: float) -> dict[str, Any]:
    """summary.json: the last evaluated round's accuracies plus fault and privacy totals."""
    last = next((r for r in reversed(history) if r["mean_accuracy"] is not None), None)
    keys = ("mean_accuracy", "worst10_accuracy", "std_accuracy", "mean_val_accuracy")
    summary: dict[str, Any] = {
        "strategy": cfg.strategy.name,
        "rounds_completed": len(history),
        **{k: (last[k] if last else None) for k in keys},
        "per_client_accuracy": last["per_client_accuracy"] if last else {},
        "wall_seconds": wall_seconds,
        "faults": fault_totals(history),
    }
    if history and "privacy" in history[-1]:
        summary["privacy"] = history[-1]["privacy"]
    return summary


def round_privacy(cfg: Config, history: Sequence[Row], aggregated: bool) -> dict[str, Any] | None:
    """Privacy spent after this round (rounds that released an aggregate are accounted)."""
    pc = cfg.privacy
    if not pc.enabled or pc.clip_norm is None:
        return None
    rounds = sum(1 for r in history if r.get("aggregated", True)) + int(aggregated)
    q = cfg.clients_per_round() / cfg.data.num_clients
    return privacy_report(float(pc.clip_norm), pc.noise_multiplier, pc.delta, min(1.0, q), rounds)


def format_round(row: Row, total: int) -> str:
    """One progress line for a round."""
    acc = row["mean_accuracy"]
    parts = [f"round {row['round']}/{total}"]
    if acc is not None:
        val = row.get("mean_val_accuracy")
        parts.append(f"mean acc {acc:.3f}  worst10 {row['worst10_accuracy']:.3f}"
                     + (f"  val {val:.3f}" if val is not None else ""))
    parts.append(f"clients {len(row['accepted'])}/{len(row['participants'])}")
    if row["failed"] or row["stragglers"] or row["rejected"] or row.get("eval_failed"):
        parts.append(f"failed {len(row['failed'])} stragglers {len(row['stragglers'])} "
                     f"rejected {len(row['rejected'])} "
                     f"eval-failed {len(row.get('eval_failed', {}))}")
    if not row.get("aggregated", True):
        parts.append("NOT aggregated")
    if row.get("privacy") and row["privacy"].get("epsilon") is not None:
        parts.append(f"eps {row['privacy']['epsilon']:.2f}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def format_client_table(summary: dict[str, Any], groups: Sequence[int]) -> str:
    """Final per-client table."""
    lines = ["client group test_acc"]
    for cid, acc in summary["per_client_accuracy"].items():
        lines.append(f"{cid:>6} {groups[int(cid)]:>5} {acc:8.3f}")
    if summary["mean_accuracy"] is not None:
        lines.append(f"mean {summary['mean_accuracy']:.3f}  "
                     f"worst10% {summary['worst10_accuracy']:.3f}  "
                     f"({summary['wall_seconds']:.0f}s)")
    return "\n".join(lines)


def past_gate_scores(history: Sequence[Row],
                     mixes: Sequence[float]) -> dict[int, list[list[dict[str, float]]]]:
    """Each client's gate scores of the earlier rounds in ``history`` (oldest first), as
    :func:`fedbip_ray.core.gate.pool_rounds` reads them; rows that scored a different number
    of mixes (another config before a resume) are skipped."""
    out: dict[int, list[list[dict[str, float]]]] = {}
    for row in history:
        for cid, scores in (row.get("gate_scores") or {}).items():
            if len(scores) == len(mixes):
                out.setdefault(int(cid), []).append([_score(x) for x in scores])
    return out


def _score(entry: Sequence[float | None]) -> dict[str, float]:
    """A metrics.jsonl gate score ``[accuracy, n(, loss(, loss_sd))]`` as choose_mix reads it."""
    def num(x: float | None) -> float:
        return math.nan if x is None else float(x)
    out = {"accuracy": num(entry[0]), "n": float(entry[1])}
    for key, x in zip(("loss", "loss_sd"), entry[2:4], strict=False):
        out[key] = num(x)
    return out


def _finite(x: Any) -> float | None:
    """``x`` as a float, None when missing or not finite (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None
