"""The round loop: sample clients, submit every fit, wait with a deadline, aggregate on the
server actor, evaluate, write metrics and an atomic checkpoint every round."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray

from fedbip_ray.config import Config, ConfigError, dump_config
from fedbip_ray.core.strategies import make_strategy
from fedbip_ray.data.shards import ShardSet, build_shards, format_summary
from fedbip_ray.runtime.client import ClientActor
from fedbip_ray.runtime.server import ServerActor

log = logging.getLogger("fedbip.federation")


class RunCallback(Protocol):
    """Observers of a run (progress display, MLflow)."""

    def on_start(self, run: RunContext) -> None: ...
    def on_round(self, run: RunContext, row: dict[str, Any], report: dict[str, Any]) -> None: ...
    def on_end(self, run: RunContext, summary: dict[str, Any]) -> None: ...


@dataclass
class RunContext:
    """What callbacks may look at: config, output dir, shards and the live actors."""

    cfg: Config
    output: Path
    shards: ShardSet
    server: Any
    actors: list[Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def actor_for(self, client_id: int) -> Any:
        return self.actors[client_id % len(self.actors)]


# ---------------------------------------------------------------------------------- helpers
def ray_env_defaults() -> None:
    """Environment that makes a local Ray quiet and loopback-only (set before ray.init)."""
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` (e.g. inside ``ray job submit``) or start an embedded local Ray."""
    if ray.is_initialized():
        return
    ray_env_defaults()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, logging_level=logging.WARNING)


def plan_actors(cfg: Config, resources: dict[str, float]) -> int:
    """How many client actors fit on the cluster; raises ConfigError if not even one does."""
    rc = cfg.resources
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if rc.num_gpus_per_client > gpus:
        raise ConfigError(
            f"resources.num_gpus_per_client={rc.num_gpus_per_client:g}: the Ray cluster has "
            f"{gpus:g} GPUs (set it to 0 to train on CPU)"
        )
    if rc.num_cpus_per_client > cpus:
        raise ConfigError(
            f"resources.num_cpus_per_client={rc.num_cpus_per_client:g}: the Ray cluster has {cpus:g} CPUs"
        )
    fit = math.inf
    if rc.num_cpus_per_client > 0:
        fit = min(fit, cpus // rc.num_cpus_per_client)
    if rc.num_gpus_per_client > 0:
        fit = min(fit, gpus // rc.num_gpus_per_client)
    n = min(cfg.data.num_clients, int(fit) if fit != math.inf else cfg.data.num_clients)
    if rc.max_actors:
        n = min(n, rc.max_actors)
    return max(1, n)


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


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _append_line(path: Path, obj: Any) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(output: Path, server: Any, round_num: int, history: list[dict]) -> None:
    """Atomically write ``checkpoints/round_XXXXX`` then point ``checkpoints/latest`` at it."""
    root = output / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"round_{round_num:05d}"
    tmp = root / f".tmp_round_{round_num:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    ray.get(server.save.remote(str(tmp)))
    _write_json_atomic(tmp / "meta.json", {"round": round_num, "history": history})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json_atomic(root / "latest.json", {"round": round_num, "path": final.name})
    for old in sorted(root.glob("round_*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint_meta(output: Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint dir, meta) of the latest complete checkpoint, or None."""
    latest = output / "checkpoints" / "latest.json"
    if not latest.is_file():
        return None
    try:
        pointer = json.loads(latest.read_text())
        ckpt = output / "checkpoints" / pointer["path"]
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--resume {output}: unreadable checkpoint ({exc})") from None
    return ckpt, meta


# ---------------------------------------------------------------------------------- the run
def _evaluate(ctx: RunContext, round_num: int, finetune_epochs: int) -> dict[int, dict[str, dict]]:
    refs = {}
    for cid in range(ctx.shards.num_clients):
        state = ctx.server.get_state.remote(cid)
        refs[cid] = ctx.actor_for(cid).evaluate.remote(cid, state, round_num, ("val", "test"), finetune_epochs)
    out: dict[int, dict[str, dict]] = {}
    for cid, ref in refs.items():
        try:
            out[cid] = ray.get(ref).splits
        except ray.exceptions.RayError as exc:
            log.warning("round %d: evaluation of client %d failed: %s", round_num, cid, exc)
    return out


def _round_row(round_num: int, evals: dict[int, dict[str, dict]], report: dict[str, Any],
               participants: list[int], stragglers: list[int], seconds: float,
               train_loss: float) -> dict[str, Any]:
    acc = {c: e["test"]["accuracy"] for c, e in sorted(evals.items())}
    val = {c: e["val"]["accuracy"] for c, e in sorted(evals.items())}
    values = [a for a in acc.values() if a == a]
    vvals = [a for a in val.values() if a == a]
    return {
        "round": round_num,
        "mean_accuracy": float(np.mean(values)) if values else None,
        "std_accuracy": float(np.std(values)) if values else None,
        "worst10_accuracy": worst_fraction_mean(values) if values else None,
        "mean_val_accuracy": float(np.mean(vvals)) if vvals else None,
        "per_client_accuracy": {str(c): a for c, a in acc.items()},
        "per_client_val_accuracy": {str(c): a for c, a in val.items()},
        "test_loss": float(np.mean([e["test"]["loss"] for e in evals.values()])) if evals else None,
        "train_loss": train_loss,
        "participants": participants,
        "accepted": report.get("accepted", []),
        "rejected": report.get("rejected", {}),
        "failed": report.get("failed", {}),
        "stragglers": stragglers,
        "bytes_in": report.get("bytes_in", 0),
        "bytes_out": report.get("bytes_out", 0),
        "seconds": seconds,
    }


def run_federation(cfg: Config, output: str | Path, resume: bool = False,
                   callbacks: Sequence[RunCallback] = (),
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a federation described by ``cfg``; return ``summary.json``'s content."""
    out = Path(output)
    start_wall = time.perf_counter()
    ckpt = load_checkpoint_meta(out) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"--resume {out}: no checkpoint found")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    strategy = make_strategy(cfg.strategy.name, cfg.strategy.params)

    ensure_ray()
    num_actors = plan_actors(cfg, ray.cluster_resources())
    shards = build_shards(cfg.data, cfg.seed, out / "shards")
    echo(format_summary(shards.summary))
    shard_refs = {cid: ray.put(p.read_bytes()) for cid, p in enumerate(shards.paths)}
    rc = cfg.resources
    actors = []
    for a in range(num_actors):
        mine = {cid: ref for cid, ref in shard_refs.items() if cid % num_actors == a}
        actors.append(ClientActor.options(num_cpus=rc.num_cpus_per_client, num_gpus=rc.num_gpus_per_client,
                                          name=None).remote(cfg.to_dict(), mine, shards.num_labels))
    upd = cfg.federation.updates
    server = ServerActor.options(num_cpus=0).remote(
        cfg.strategy.name, dict(cfg.strategy.params), shards.num_clients, list(shards.groups),
        upd.max_norm, upd.on_excess_norm)
    ctx = RunContext(cfg, out, shards, server, actors)

    info = ray.get(actors[0].info.remote())
    first_round = 1
    if ckpt is not None:
        ckpt_dir, meta = ckpt
        try:
            ray.get(server.load.remote(str(ckpt_dir)))
        except ray.exceptions.RayTaskError as exc:
            raise ConfigError(f"--resume {out}: unreadable checkpoint ({str(exc.cause)[:200]})") from None
        ctx.history = list(meta["history"])
        first_round = int(meta["round"]) + 1
        metrics_path = out / "metrics.jsonl"
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in ctx.history))
        echo(f"resumed from {ckpt_dir.name}: continuing at round {first_round}")
    else:
        ray.get(server.initialize.remote(actors[0].initial_state.remote(), info["layout"]))
        (out / "metrics.jsonl").write_text("")
    for cb in callbacks:
        cb.on_start(ctx)

    fed = cfg.federation
    k = cfg.clients_per_round()
    prox = strategy.client_options.prox_mu
    ft = strategy.client_options.finetune_epochs_before_eval
    for rnd in range(first_round, fed.rounds + 1):
        t0 = time.perf_counter()
        participants = sample_clients(shards.num_clients, k, cfg.seed, rnd)
        refs = [ctx.actor_for(c).fit.remote(c, server.get_state.remote(c), rnd, prox) for c in participants]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=fed.round_deadline_s)
        ready_set = set(ready)
        stragglers = [c for c, r in zip(participants, refs, strict=True) if r not in ready_set]
        for r in pending:
            ray.cancel(r)
        done = [(c, r) for c, r in zip(participants, refs, strict=True) if r in ready_set]
        report = ray.get(server.aggregate_refs.remote(rnd, [c for c, _ in done], [r for _, r in done]))
        n_ok = len(report["accepted"])
        if n_ok < math.ceil(fed.min_report_fraction * len(participants)):
            log.warning("round %d: only %d of %d clients reported; states kept", rnd, n_ok, len(participants))
        bytes_out = len(participants) * 4 * int(info_size(info))
        report["bytes_out"] = bytes_out
        evals: dict[int, dict[str, dict]] = {}
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            evals = _evaluate(ctx, rnd, ft)
        losses = [v for v in report.get("train_losses", []) if v is not None and v == v]
        row = _round_row(rnd, evals, report, participants, stragglers, time.perf_counter() - t0,
                         float(np.mean(losses)) if losses else None)  # type: ignore[arg-type]
        ctx.history.append(row)
        _append_line(out / "metrics.jsonl", row)
        if report.get("similarity") is not None:
            _append_line(out / "similarity.jsonl", {"round": rnd, "clients": report["accepted"],
                                                    "similarity": report["similarity"],
                                                    "weights": report["weights"]})
        save_checkpoint(out, server, rnd, ctx.history)
        for cb in callbacks:
            cb.on_round(ctx, row, report)
        echo(format_round(row, fed.rounds))

    last = next((r for r in reversed(ctx.history) if r["mean_accuracy"] is not None), None)
    summary = {
        "strategy": cfg.strategy.name,
        "rounds_completed": len(ctx.history),
        "mean_accuracy": last["mean_accuracy"] if last else None,
        "worst10_accuracy": last["worst10_accuracy"] if last else None,
        "std_accuracy": last["std_accuracy"] if last else None,
        "mean_val_accuracy": last["mean_val_accuracy"] if last else None,
        "per_client_accuracy": last["per_client_accuracy"] if last else {},
        "wall_seconds": time.perf_counter() - start_wall,
    }
    _write_json_atomic(out / "summary.json", summary)
    for cb in callbacks:
        cb.on_end(ctx, summary)
    return summary


def info_size(info: dict[str, Any]) -> int:
    """D from an actor's ``info()`` layout."""
    shapes = info["layout"]["shapes"]
    return int(sum(int(np.prod(s)) if s else 1 for s in shapes))


def format_round(row: dict[str, Any], total: int) -> str:
    """One progress line for a round."""
    acc = row["mean_accuracy"]
    parts = [f"round {row['round']}/{total}"]
    if acc is not None:
        parts.append(f"mean acc {acc:.3f}  worst10 {row['worst10_accuracy']:.3f}  val {row['mean_val_accuracy']:.3f}")
    parts.append(f"clients {len(row['accepted'])}/{len(row['participants'])}")
    if row["failed"] or row["stragglers"] or row["rejected"]:
        parts.append(f"failed {len(row['failed'])} stragglers {len(row['stragglers'])} rejected {len(row['rejected'])}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def format_client_table(summary: dict[str, Any], groups: Sequence[int]) -> str:
    """Final per-client table."""
    lines = ["client group test_acc"]
    for cid, acc in summary["per_client_accuracy"].items():
        lines.append(f"{cid:>6} {groups[int(cid)]:>5} {acc:8.3f}")
    if summary["mean_accuracy"] is not None:
        lines.append(f"mean {summary['mean_accuracy']:.3f}  worst10% {summary['worst10_accuracy']:.3f}  "
                     f"({summary['wall_seconds']:.0f}s)")
    return "\n".join(lines)
