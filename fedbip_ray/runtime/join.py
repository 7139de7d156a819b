"""``fedbip join``: new clients get a personalized adapter from a finished run.

Each newcomer fine-tunes the run's initial adapter on its own training split for
``train.local_epochs`` (on a :class:`~fedbip_ray.runtime.client.ClientActor`), which gives its
first task vector; :func:`fedbip_ray.core.join.join_aggregate` weighs it against the stored
clients' cumulative vectors with the run's own strategy; the run's validation gate picks how
far to move from the newcomer's local model towards that aggregate. Nothing of the run changes.

Output directory (default ``RUN/joined``)::

    summary.json                     one entry per newcomer (what :class:`JoinResult` holds)
    shards/newcomer_XXXXX_*.parquet  the newcomers' splits
    newcomer_XXXXX_*/adapter/        the adapter in peft format
    newcomer_XXXXX_*/join.json       weights / similarity over the clients, mix, scores
    newcomer_XXXXX_*/state.safetensors  flat (D,) float32 states: "state" (the joined
                                     adapter) and "local" (the newcomer's own fine-tune)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fedbip_ray import storage
from fedbip_ray.config import Config, ConfigError, load_config
from fedbip_ray.core.gate import choose_mix, mix_candidates
from fedbip_ray.core.join import NewcomerAggregate, join_aggregate
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.data.shards import ShardSet
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime.cluster import ensure_ray, plan_actors, preflight_ray, spawn_client
from fedbip_ray.runtime.join_data import (
    NewcomerShard,
    newcomer_dirname,
    read_newcomers,
    stored_counts,
    write_json,
    write_newcomer_shard,
)
from fedbip_ray.runtime.messages import ShardRef
from fedbip_ray.runtime.outputs import fetch_run, is_uri

SPLITS = ("val", "test")


@dataclass(frozen=True)
class RunSnapshot:
    """A finished (or checkpointed) run: its config, latest checkpoint, shards and layout."""

    run_dir: Path
    cfg: Config
    checkpoint: ckpt_io.Checkpoint
    shards: ShardSet
    layout: Layout

    @property
    def states(self) -> np.ndarray:
        """``(N, D)`` float32 stored personalized states."""
        return self.checkpoint.tensors["states"]

    @property
    def init(self) -> np.ndarray:
        """``(D,)`` float32 initial adapter of the run."""
        return self.checkpoint.tensors["init"]


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunSnapshot:
    """The run in ``run_dir`` (``config.yaml`` with ``overrides``, latest checkpoint, shards);
    :class:`ConfigError` (one line) when something is missing or does not fit."""
    if not is_uri(run_dir) and not Path(run_dir).is_dir():
        raise ConfigError(f"join: run directory {run_dir} not found")
    d = fetch_run(run_dir)  # a storage URI: its config and shards, copied locally
    if not (d / "config.yaml").is_file():
        raise ConfigError(f"join: {d} is not a run directory (no config.yaml)")
    cfg = load_config(d / "config.yaml", overrides)
    root = storage.open_location(run_dir) / "checkpoints" if is_uri(run_dir) else d / "checkpoints"
    ck = ckpt_io.read_latest(root)
    if ck is None:
        raise ConfigError(f"join: {d} has no checkpoint (checkpoints/latest.json)")
    shards = ShardSet.load(d / "shards")
    if shards.num_clients != ck.num_clients:
        raise ConfigError(f"join: {d}: checkpoint has {ck.num_clients} clients, shards "
                          f"{shards.num_clients}")
    return RunSnapshot(d, cfg, ck, shards, Layout.from_dict(ck.layout))


@dataclass(frozen=True)
class JoinResult:
    """One newcomer's outcome. ``peers`` name the entries of ``weights`` / ``similarity``:
    the run's clients (``client_XXXX``), then ``self`` (each newcomer joins on its own);
    ``mix`` is the gate's ``λ`` (state = local + λ (aggregate − local)); ``val`` / ``test``
    score that state, ``local_val`` / ``local_test`` the newcomer's own fine-tuned model."""

    name: str
    client_id: int
    directory: str
    train_examples: int
    peers: tuple[str, ...]
    weights: tuple[float, ...]
    similarity: tuple[float, ...] | None
    mix: float
    val: dict[str, float]
    test: dict[str, float]
    local_val: dict[str, float]
    local_test: dict[str, float]
    mlflow_run_id: str | None = None
    stored_groups: tuple[int, ...] = field(default=(), repr=False)

    @property
    def self_weight(self) -> float:
        """Weight the aggregate keeps on the newcomer's own task vector."""
        return self.weights[self.peers.index("self")]

    def group_share(self, group: int) -> float:
        """Share of the weight on stored clients that goes to clients of ``group``."""
        w = np.asarray(self.weights[: len(self.stored_groups)])
        total = float(w.sum())
        return float(w[np.asarray(self.stored_groups) == group].sum() / total) if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("stored_groups")
        return out


class NewcomerPool:
    """Client actors serving the newcomers' shards (newcomer ``j`` on actor ``j mod k``)."""

    def __init__(self, snap: RunSnapshot, shards: Sequence[NewcomerShard]) -> None:
        cfg = snap.cfg
        self.cfg, self.shards = cfg, {s.newcomer.client_id: s for s in shards}
        self.round = snap.checkpoint.round + 1
        k = max(1, min(len(shards), plan_actors(cfg, ray.cluster_resources())))
        self.actors = [spawn_client(cfg, snap.shards.num_labels) for _ in range(k)]
        self.refs = {cid: ShardRef(cid, ray.put(s.path.read_bytes()))
                     for cid, s in self.shards.items()}
        self._of = {cid: self.actors[j % k] for j, cid in enumerate(self.shards)}
        infos = ray.get([a.info.remote() for a in self.actors])
        for info in infos:
            if info.get("error"):
                raise ConfigError(info["error"])
        diff = Layout.from_dict(infos[0]["layout"]).first_difference(snap.layout)
        if diff:
            raise ConfigError(f"join: the run's checkpoint adapter does not match the model "
                              f"({diff})")

    def fit(self, init: np.ndarray, prox_mu: float) -> dict[int, np.ndarray]:
        """Each newcomer's task vector ``(D,)`` float32 from ``init`` (one local-epochs fit)."""
        refs = {c: self._of[c].fit.remote(c, init, self.round, prox_mu, self.refs[c])
                for c in self.shards}
        return {c: np.asarray(ray.get(r).vector, dtype=np.float32) for c, r in refs.items()}

    def gate(self, aggregates: dict[int, np.ndarray], locals_: dict[int, np.ndarray],
             mixes: tuple[float, ...], ties: str) -> dict[int, float]:
        """The gate's ``λ`` per newcomer on its validation split (1.0 when the gate is off;
        exact accuracy ties broken as ``ties`` says)."""
        if not mixes:
            return {c: 1.0 for c in aggregates}
        refs = {c: self._of[c].score_mixes.remote(c, aggregates[c], mixes, self.round,
                                                  self.refs[c], locals_[c]) for c in aggregates}
        return {c: choose_mix(ray.get(r), mixes, ties) for c, r in refs.items()}

    def evaluate(self, states: dict[int, np.ndarray],
                 finetune_epochs: int = 0) -> dict[int, dict[str, dict[str, float]]]:
        """``{client: {"val": scores, "test": scores}}`` of each state (optionally after a
        local fine-tune of ``finetune_epochs``, not kept)."""
        refs = {c: self._of[c].evaluate.remote(c, s, self.round, SPLITS, finetune_epochs,
                                               self.refs[c]) for c, s in states.items()}
        return {c: {k: dict(v) for k, v in ray.get(r).splits.items()} for c, r in refs.items()}

    def export(self, client_id: int, state: np.ndarray) -> dict[str, bytes]:
        """The adapter in peft format as {file name: bytes}."""
        return ray.get(self._of[client_id].export_adapter.remote(client_id, state))

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass


@dataclass(frozen=True)
class Joined:
    """What the join computed for one newcomer before it is written out."""

    shard: NewcomerShard
    aggregate: NewcomerAggregate
    local: np.ndarray  # (D,) float32
    state: np.ndarray  # (D,) float32 after the gate
    mix: float


def personalize(snap: RunSnapshot, pool: NewcomerPool,
                shards: Sequence[NewcomerShard]) -> list[Joined]:
    """Fit every newcomer from the run's init, join it with the run's strategy, gate it."""
    strategy = snap.cfg.strategy.build()
    opts = strategy.client_options
    taus = pool.fit(snap.init, opts.prox_mu)
    ids = [s.newcomer.client_id for s in shards]
    aggs = join_aggregate(strategy, snap.states, snap.init, np.stack([taus[c] for c in ids]),
                          snap.layout, stored_counts(snap.shards),
                          np.asarray([s.train for s in shards]))
    locals_ = {c: snap.init + taus[c] for c in ids}
    mixes = pool.gate({c: a.state for c, a in zip(ids, aggs, strict=True)}, locals_,
                      opts.gate_mixes, opts.gate_ties)
    return [Joined(s, a, locals_[c], mix_candidates(locals_[c], a.state, [mixes[c]])[0],
                   mixes[c]) for s, a, c in zip(shards, aggs, ids, strict=True)]


def _peers(snap: RunSnapshot) -> tuple[str, ...]:
    return (*(f"client_{c:04d}" for c in range(snap.shards.num_clients)), "self")


def _write(out: Path, j: Joined, files: dict[str, bytes], result: JoinResult) -> None:
    from safetensors.numpy import save_file

    d = out / result.directory
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / "adapter" / name).write_bytes(data)
    save_file({"state": np.ascontiguousarray(j.state, dtype=np.float32),
               "local": np.ascontiguousarray(j.local, dtype=np.float32)},
              str(d / "state.safetensors"))
    write_json(d / "join.json", result.to_dict())


def _result(snap: RunSnapshot, j: Joined, peers: tuple[str, ...], scores: dict[str, Any],
            local: dict[str, Any]) -> JoinResult:
    a = j.aggregate
    return JoinResult(
        name=j.shard.newcomer.name, client_id=j.shard.newcomer.client_id,
        directory=newcomer_dirname(j.shard.newcomer), train_examples=j.shard.train, peers=peers,
        weights=tuple(float(w) for w in a.weights),
        similarity=tuple(float(s) for s in a.similarity) if a.similarity is not None else None,
        mix=j.mix, val=scores["val"], test=scores["test"], local_val=local["val"],
        local_test=local["test"], stored_groups=snap.shards.groups)


def join_run(run_dir: str | Path, data: str | Path, client_column: str | None = None,
             overrides: Sequence[str] = (), output: str | Path | None = None,
             echo: Callable[[str], None] = print) -> list[JoinResult]:
    """Join the newcomers in ``data`` to the run in ``run_dir``; write their adapters, weights
    and scores into ``output`` (default ``run_dir/joined``). Input problems raise
    :class:`ConfigError` before any actor starts (a model mismatch right after)."""
    snap = load_run(run_dir, overrides)
    newcomers = read_newcomers(data, snap.cfg, snap.shards, client_column)
    out = Path(output) if output is not None else snap.run_dir / "joined"
    shards = [write_newcomer_shard(n, snap.cfg, out / "shards") for n in newcomers]
    preflight_ray()
    if snap.cfg.tracking.mlflow:  # an http store that does not answer: fail before training
        from fedbip_ray.tracking.mlflow_logger import probe_tracking, tracking_uri

        probe_tracking(tracking_uri(snap.cfg))
    ensure_ray()
    pool = NewcomerPool(snap, shards)
    try:
        joined = personalize(snap, pool, shards)
        ft = snap.cfg.strategy.build().client_options.finetune_epochs_before_eval
        scores = pool.evaluate({j.shard.newcomer.client_id: j.state for j in joined}, ft)
        local = pool.evaluate({j.shard.newcomer.client_id: j.local for j in joined})
        peers = _peers(snap)
        results = []
        for j in joined:
            cid = j.shard.newcomer.client_id
            res = _result(snap, j, peers, scores[cid], local[cid])
            _write(out, j, pool.export(cid, j.state), res)
            results.append(res)
    finally:
        pool.close()
    results = _track(snap, out, results)
    write_json(out / "summary.json", {"run": str(snap.run_dir), "data": str(data),
                                      "newcomers": [r.to_dict() for r in results]})
    echo(format_results(results))
    return results


def _track(snap: RunSnapshot, out: Path, results: list[JoinResult]) -> list[JoinResult]:
    """Log the join as an MLflow run of its own when the run used MLflow."""
    if not snap.cfg.tracking.mlflow:
        return results
    from dataclasses import replace

    from fedbip_ray.tracking.join_run import log_join

    run_id = log_join(snap.cfg, snap.run_dir, snap.checkpoint.extra, out, results)
    results = [replace(r, mlflow_run_id=run_id) for r in results]
    for r in results:
        write_json(out / r.directory / "join.json", r.to_dict())
    return results


def format_results(results: Sequence[JoinResult]) -> str:
    """A table: newcomer, examples, gate mix, self weight, top peers, val/test accuracy."""
    lines = ["newcomer             train  mix  self  top peers                   val    test"
             "   local test"]
    for r in results:
        order = np.argsort(r.weights)[::-1]
        top = ", ".join(f"{r.peers[i].removeprefix('client_')}={r.weights[i]:.2f}"
                        for i in order[:4] if r.weights[i] > 0 and r.peers[i] != "self")
        lines.append(f"{r.name[:20]:<20} {r.train_examples:>5} {r.mix:>4.2f} "
                     f"{r.self_weight:>5.2f}  {top[:26]:<26} {r.val.get('accuracy', 0):>6.3f} "
                     f"{r.test.get('accuracy', 0):>6.3f} {r.local_test.get('accuracy', 0):>8.3f}")
    return "\n".join(lines)
