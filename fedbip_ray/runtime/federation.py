"""The round loop: sample clients, dispatch their fits to the client actors, wait with a
deadline, aggregate on the server actor, evaluate, write metrics and an atomic checkpoint.

Dispatch keeps one call in flight per client actor and hands a free actor the next client
(its own first, else one queued on the busiest actor), so clients of unequal cost (data sizes,
answer lengths) do not leave actors idle while one works through a long queue.

Faults: a client whose actor dies, raises or misses ``federation.round_deadline_s`` is dropped
from the round (``failed`` / ``stragglers`` in metrics.jsonl); the round aggregates the rest if
at least ``federation.min_report_fraction`` of the participants sent a valid update, else it
keeps every state (``aggregated: false``). Ray restarts a crashed actor (``max_restarts``); one
that is gone for good is replaced. ``--resume`` continues from the latest checkpoint and
reproduces an uninterrupted run (sampling, training and DP noise are seeded per round).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import yaml

from fedbip_ray.config import Config, ConfigError, ModelConfig
from fedbip_ray.core.gate import choose_mix
from fedbip_ray.core.strategies import Strategy, make_strategy
from fedbip_ray.data.shards import ShardSet, build_shards, format_summary
from fedbip_ray.privacy.accounting import privacy_report
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime.client import ClientActor, one_line
from fedbip_ray.runtime.messages import ShardRef
from fedbip_ray.runtime.scheduling import home_queues, take_next
from fedbip_ray.runtime.server import ServerActor, failure_reason

log = logging.getLogger("fedbip.federation")
TEST_ENV_PREFIX = "FEDBIP_TEST_"  # forwarded to client actors (test-only fault injection)
PING_TIMEOUT_S = 300.0  # how long a restarting actor may take to come back
NO_LIVE_ACTOR = "no live client actor left in this phase"  # why a never-started call failed
# errors that mean "the actor's process died" (killed, OOM-killed, crashed), not "the call failed"
PROCESS_DEATH = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError,
                 ray.exceptions.WorkerCrashedError)


class RunCallback(Protocol):
    """Observers of a run (progress display, MLflow). A callback may also define
    ``on_error(run, exc)``: called once when the run fails (then the error is re-raised).
    In ``on_round`` the round's checkpoint may still be being written: a callback that reads
    it calls ``run.checkpoints.wait()`` first."""

    def on_start(self, run: RunContext) -> None: ...
    def on_round(self, run: RunContext, row: dict[str, Any], report: dict[str, Any]) -> None: ...
    def on_end(self, run: RunContext, summary: dict[str, Any]) -> None: ...


@dataclass
class RunContext:
    """What callbacks may look at: config, output dir, shards and the live actors.

    ``first_round`` is 1 for a fresh run, R + 1 when resumed from round R's checkpoint
    (``history`` then already holds rows 1..R).
    """

    cfg: Config
    output: Path
    shards: ShardSet
    server: Any = None
    actors: list[Any] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    shard_refs: dict[int, ShardRef] = field(default_factory=dict)
    first_round: int = 1
    checkpoints: Any = None  # the run's CheckpointWriter
    # {phase: {client: seconds its last call took}}: the dispatch order of the next phase
    call_seconds: dict[str, dict[int, float]] = field(default_factory=dict)

    def actor_index(self, client_id: int) -> int:
        """The client's home actor (its calls go there unless another actor is idle first)."""
        return client_id % len(self.actors)

    def actor_for(self, client_id: int) -> Any:
        return self.actors[self.actor_index(client_id)]


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
    """Join ``RAY_ADDRESS`` (e.g. inside ``ray job submit``) or start an embedded local Ray
    bound to 127.0.0.1 without a dashboard."""
    if ray.is_initialized():
        return
    ray_env_defaults()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")


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


def min_reports(fraction: float, participants: int) -> int:
    """Valid updates a round needs before it aggregates (at least one)."""
    return max(1, math.ceil(fraction * participants - 1e-9))


def _append_line(path: Path, obj: Any) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """JSON lines of ``path`` (a torn last line from a killed run is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _test_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on an output directory (released even if the process is killed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = (out / ".lock").open("w")
    except OSError as exc:
        raise ConfigError(f"output directory {out}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"output {out}: another fedbip run is using this directory") from None
        yield
    finally:
        fh.close()


# ---------------------------------------------------------------------------------- preflight
def preflight_model(model: ModelConfig) -> None:
    """Driver-side check that ``model.name`` can be found offline, before any actor starts.

    Aliases are checked by the actors (one-line error via ``info``); a directory must hold a
    config.json; any other name must be a valid model id already in the local HF cache.
    """
    from fedbip_ray.models.names import MODEL_ALIASES, resolve_model_path  # no torch in the driver

    name = model.name
    if model.task == "image-classification" or name in MODEL_ALIASES:
        return
    if Path(name).expanduser().exists():
        if model.task == "sequence-classification":
            resolve_model_path(name)  # a directory must hold config.json
        return
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = (f"model.name '{name}': not an alias ({', '.join(MODEL_ALIASES)}), an existing "
            "directory, or a model in the local Hugging Face cache (nothing is downloaded)")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(hint) from None
    if not (Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}").is_dir():
        raise ConfigError(hint)


def build_strategy(cfg: Config) -> Strategy:
    """The configured strategy (ConfigError naming ``strategy.params`` on a bad value)."""
    try:
        return make_strategy(cfg.strategy.name, cfg.strategy.params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy.params: {one_line(exc)}") from None


def load_resume_checkpoint(out: Path, cfg: Config) -> ckpt_io.Checkpoint | None:
    """The latest checkpoint of ``out`` (None: none yet), checked against ``cfg``."""
    ck = ckpt_io.read_latest(out / "checkpoints")
    if ck is None:
        return None
    diff = ckpt_io.config_difference(ck.config, cfg.to_dict())
    if diff is not None:
        raise ConfigError(f"--resume {out}: config differs from the checkpoint's ({diff})")
    return ck


# ---------------------------------------------------------------------------------- actors
def _spawn_client(cfg: Config, num_labels: int) -> Any:
    rc = cfg.resources
    opts: dict[str, Any] = {"num_cpus": rc.num_cpus_per_client, "num_gpus": rc.num_gpus_per_client}
    env = _test_env()
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return ClientActor.options(**opts).remote(cfg.to_dict(), num_labels)


def _start_actors(ctx: RunContext, num_actors: int) -> dict[str, Any]:
    """Start the client and server actors; return the first client's ``info()``.

    Raises ConfigError when a client cannot build its model (one line, from the actor).
    """
    cfg = ctx.cfg
    ctx.actors = [_spawn_client(cfg, ctx.shards.num_labels) for _ in range(num_actors)]
    upd, pc = cfg.federation.updates, cfg.privacy
    privacy = {"clip_norm": pc.clip_norm, "noise_multiplier": pc.noise_multiplier} if pc.enabled else None
    ctx.server = ServerActor.options(num_cpus=0).remote(
        cfg.strategy.name, dict(cfg.strategy.params), ctx.shards.num_clients, list(ctx.shards.groups),
        upd.max_norm, upd.on_excess_norm, privacy, cfg.seed)
    infos = ray.get([a.info.remote() for a in ctx.actors])
    for info in infos:
        if info.get("error"):
            raise ConfigError(info["error"])
    return infos[0]


def _stop_actors(ctx: RunContext) -> None:
    for actor in [*ctx.actors, ctx.server]:
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _actor_alive(actor: Any, timeout: float) -> bool:
    """False only if the actor is dead for good (a restarting one is waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        except ray.exceptions.ActorDiedError:
            return False
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                return True
            time.sleep(0.5)
        except ray.exceptions.GetTimeoutError:
            return True  # busy (e.g. still on a cancelled straggler call)


def heal_actors(ctx: RunContext, actor_indices: Sequence[int]) -> int:
    """Wait for the client actors ``actor_indices`` to be back; replace those that are dead for
    good. Returns the number replaced."""
    replaced = 0
    for i in sorted(set(actor_indices)):
        if not _actor_alive(ctx.actors[i], PING_TIMEOUT_S):
            log.warning("client actor %d is dead (restarts exhausted): starting a new one", i)
            ctx.actors[i] = _spawn_client(ctx.cfg, ctx.shards.num_labels)
            replaced += 1
    return replaced


# ---------------------------------------------------------------------------------- phases
def _cancel(refs: Sequence[Any]) -> None:
    """Cancel calls past the deadline (the actor stops them at its next batch)."""
    for r in refs:
        try:
            ray.cancel(r)
        except Exception:  # noqa: BLE001 - e.g. its actor is already gone
            pass


def prefetch_states(ctx: RunContext, clients: Sequence[int]) -> dict[int, Any]:
    """Refs of the clients' current states, asked from the server actor up front, so that a
    call dispatched later does not wait for a server round trip."""
    return {c: ctx.server.get_state.remote(c) for c in clients}


@dataclass
class Dispatch:
    """What :func:`dispatch` ran: ``done`` maps each client whose call finished to
    ``(payload ref, error)`` (error: the Ray error of its receipt, else None); ``ran_on`` the
    actor index that ran (or was running) each started client; ``late`` the clients not done
    by the deadline (cancelled, or never started); ``orphans`` the clients never started
    because every actor had died; ``dead`` the actors whose process died during the phase;
    ``seconds`` the wall time of each call that finished without error."""

    done: dict[int, tuple[Any, BaseException | None]] = field(default_factory=dict)
    ran_on: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)


def dispatch(ctx: RunContext, clients: Sequence[int], call: Callable[[int, int], tuple[Any, Any]],
             deadline_s: float, prefer: Mapping[int, int] | None = None,
             phase: str | None = None) -> Dispatch:
    """Run ``call(actor index, client) -> (receipt ref, payload ref)`` for every client, with at
    most one call in flight per client actor, so that clients of unequal cost keep every actor
    busy: a free actor takes the next of its own clients (``prefer``, else ``c mod A``: its data
    is already tokenized there), longest first by what each client's last call of this
    ``phase`` took, else the cheapest queued client of the actor with the most work left
    (:mod:`fedbip_ray.runtime.scheduling`). The driver fetches only receipts (small); an actor
    whose process died takes no more calls in this phase. Calls still running at the deadline
    are cancelled. The seconds of this phase's calls are kept in ``ctx.call_seconds``."""
    cost = ctx.call_seconds.setdefault(phase, {}) if phase else None
    queues = home_queues(clients, len(ctx.actors), prefer, cost)  # home: RunContext.actor_index
    out = Dispatch()
    free = deque(range(len(ctx.actors)))
    inflight: dict[Any, tuple[int, int, Any, float]] = {}  # receipt -> (client, actor, payload, start)
    deadline = time.monotonic() + deadline_s

    while True:
        while free:
            a = free.popleft()
            c = take_next(queues, a, cost)
            if c is None:
                break
            t0 = time.monotonic()
            receipt, payload = call(a, c)
            inflight[receipt] = (c, a, payload, t0)
            out.ran_on[c] = a
        left = deadline - time.monotonic()
        if not inflight or left <= 0:
            break
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=left)
        for receipt in ready:
            c, a, payload, t0 = inflight.pop(receipt)
            error: BaseException | None = None
            try:
                ray.get(receipt)
            except PROCESS_DEATH as exc:
                error = exc
                out.dead.add(a)
            except ray.exceptions.RayError as exc:
                error = exc
            else:
                out.seconds[c] = time.monotonic() - t0
            out.done[c] = (payload, error)
            if a not in out.dead:
                free.append(a)
        if not ready:
            break  # the deadline passed
    if cost is not None:
        cost.update(out.seconds)
    _cancel([payload for _, _, payload, _ in inflight.values()] + list(inflight))
    queued = [c for q in queues.values() for c in q]
    out.late = sorted([c for c, _, _, _ in inflight.values()]
                      + (queued if len(out.dead) < len(ctx.actors) else []))
    out.orphans = sorted(queued) if len(out.dead) == len(ctx.actors) else []
    return out


@dataclass(frozen=True)
class FitOutcome:
    """The participants whose fit returned in time, with their update refs, in participant
    order; ``run`` says which actor ran each (the validation gate goes back to it), which were
    late (stragglers) or never started, and which actors died."""

    done: list[tuple[int, Any]]
    run: Dispatch

    @property
    def stragglers(self) -> list[int]:
        return self.run.late


def fit_phase(ctx: RunContext, rnd: int, participants: list[int], prox_mu: float,
              deadline_s: float, gradient: bool = False, keep: bool = False) -> FitOutcome:
    """Every participant's fit through :func:`dispatch` (``keep``: actors keep each trained
    state for the validation gate). The update refs are not fetched here: the server pulls
    them (a failed fit's ref carries its error to the server, which reports it)."""
    states = prefetch_states(ctx, participants)

    def call(a: int, c: int) -> tuple[Any, Any]:
        return ctx.actors[a].fit_receipt.remote(c, states[c], rnd, prox_mu, ctx.shard_refs[c],
                                                gradient, keep)

    run = dispatch(ctx, participants, call, deadline_s, phase="fit")
    if run.late:
        log.warning("round %d: stragglers past the %.3gs deadline: %s", rnd, deadline_s, run.late)
    if run.orphans:
        log.warning("round %d: every client actor died; not started: %s", rnd, run.orphans)
    done = [(c, run.done[c][0]) for c in participants if c in run.done]
    return FitOutcome(done, run)


def gate_phase(ctx: RunContext, rnd: int, clients: Sequence[int], mixes: tuple[float, ...],
               deadline_s: float, send_local: Sequence[int] = (),
               ran_on: Mapping[int, int] | None = None) -> tuple[dict[int, float], int]:
    """Validation gate (:mod:`fedbip_ray.core.gate`): every aggregated client scores
    ``local + λ (aggregate − local)`` for each ``λ`` on its validation split; the server keeps
    the best. The actor that ran the client's ``fit`` (``ran_on``) kept ``local``; the server
    sends it only to the clients in ``send_local`` (their task vector was clipped) and to those
    whose call landed on an actor without it (restarted, or another actor took the call).
    A client whose scoring fails or misses the deadline keeps its aggregate.
    Returns (the chosen ``λ`` per client, how many times ``local`` was sent)."""
    kept_on = dict(ran_on) if ran_on is not None else {c: ctx.actor_index(c) for c in clients}
    sent: list[int] = []  # clients sent ``local``, once per send

    def call(with_local: bool) -> Callable[[int, int], tuple[Any, Any]]:
        def run(a: int, c: int) -> tuple[Any, Any]:
            local = None
            if with_local or c in resend or kept_on.get(c) != a:  # (another actor took the call)
                local = ctx.server.gate_local.remote(c)
                sent.append(c)
            ref = ctx.actors[a].score_mixes.remote(c, states[c], mixes, rnd, ctx.shard_refs[c], local)
            return ref, ref
        return run

    t0, resend = time.monotonic(), set(send_local)
    states = prefetch_states(ctx, clients)
    scores, errors = collect(dispatch(ctx, clients, call(False), deadline_s, kept_on, "gate"), deadline_s)
    lost = [c for c, s in scores.items() if s is None]
    if lost:  # the actor no longer holds the client's trained state: send it
        again, errors2 = collect(dispatch(ctx, lost, call(True),
                                          max(1.0, deadline_s - (time.monotonic() - t0)), kept_on),
                                 deadline_s)
        scores = {**{c: s for c, s in scores.items() if s is not None}, **again}
        errors.update(errors2)
    for cid, err in errors.items():
        log.warning("round %d: validation gate of client %d failed (%s): aggregate kept", rnd, cid,
                    err if isinstance(err, str) else failure_reason(err))
    chosen = {cid: choose_mix(s, mixes) for cid, s in scores.items() if s is not None}
    ray.get(ctx.server.apply_gate.remote(chosen))
    return chosen, len(sent)


def collect(run: Dispatch, deadline_s: float) -> tuple[dict[int, Any], dict[int, BaseException | str]]:
    """(results, errors) of a :func:`dispatch` of calls with small results: an error is the
    call's Ray error, or a string for a call past the deadline or never started."""
    results: dict[int, Any] = {}
    errors: dict[int, BaseException | str] = {c: f"past the {deadline_s:.3g}s deadline" for c in run.late}
    errors.update({c: NO_LIVE_ACTOR for c in run.orphans})
    for cid, (ref, error) in sorted(run.done.items()):  # client order, whatever finished first
        if error is not None:
            errors[cid] = error
            continue
        try:
            results[cid] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            errors[cid] = exc
    return results, errors


def _eval_pass(ctx: RunContext, rnd: int, clients: Sequence[int], finetune_epochs: int,
               deadline_s: float) -> tuple[dict[int, dict], dict[int, BaseException | str], Dispatch]:
    states = prefetch_states(ctx, clients)

    def call(a: int, c: int) -> tuple[Any, Any]:
        ref = ctx.actors[a].evaluate.remote(c, states[c], rnd, ("val", "test"), finetune_epochs,
                                            ctx.shard_refs[c])
        return ref, ref

    run = dispatch(ctx, clients, call, deadline_s, phase="evaluate")
    results, errors = collect(run, deadline_s)
    return {cid: r.splits for cid, r in results.items()}, errors, run


def evaluate_phase(ctx: RunContext, rnd: int, finetune_epochs: int,
                   deadline_s: float) -> tuple[dict[int, dict], dict[int, str], int]:
    """Evaluate every client; clients whose actor died are retried once on the restarted (or
    replaced) actor. Returns (results, failures {client: reason}, actors replaced)."""
    clients = list(range(ctx.shards.num_clients))
    results, errors, run = _eval_pass(ctx, rnd, clients, finetune_epochs, deadline_s)
    retry = sorted([c for c, e in errors.items() if isinstance(e, PROCESS_DEATH)] + run.orphans)
    replaced = 0
    if retry:
        replaced = heal_actors(ctx, sorted(run.dead))
        again, errors2, _ = _eval_pass(ctx, rnd, retry, finetune_epochs, deadline_s)
        results.update(again)
        errors = {**{c: e for c, e in errors.items() if c not in retry}, **errors2}
    failures = {c: e if isinstance(e, str) else failure_reason(e) for c, e in sorted(errors.items())}
    for cid, why in failures.items():
        log.warning("round %d: evaluation of client %d failed: %s", rnd, cid, why)
    return results, failures, replaced


# ---------------------------------------------------------------------------------- rows
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


def round_row(round_num: int, evals: dict[int, dict[str, dict]], report: dict[str, Any],
              participants: list[int], stragglers: list[int], seconds: float,
              eval_failed: dict[int, str] | None = None, actors_replaced: int = 0,
              privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """One metrics.jsonl row (see README, Outputs and Guarantees)."""
    acc = {c: e["test"]["accuracy"] for c, e in sorted(evals.items())}
    val = {c: e["val"]["accuracy"] for c, e in sorted(evals.items())}
    values = [a for a in acc.values() if a == a]
    vvals = [a for a in val.values() if a == a]
    losses = [v for v in report.get("train_losses", []) if v is not None and v == v]
    eval_failed = eval_failed or {}
    aggregated = bool(report.get("aggregated", bool(report.get("accepted"))))
    extra: dict[str, float] = {"aggregation_skipped": float(not aggregated),
                               "clients_eval_failed": float(len(eval_failed)),
                               "actors_replaced": float(actors_replaced)}
    if privacy is not None and privacy.get("epsilon") is not None:
        extra["dp_epsilon"] = float(privacy["epsilon"])
    if report.get("train_steps"):
        extra["train_step_seconds"] = float(report["train_seconds"]) / float(report["train_steps"])
    peak = report.get("client_peak_rss_mib")
    if peak is not None and peak == peak:
        extra["client_peak_rss_mib"] = float(peak)
    for phase, secs in (report.get("phase_seconds") or {}).items():
        extra[f"{phase}_seconds"] = float(secs)
    gate = report.get("gate") or {}
    if gate:
        extra["gate_locals_sent"] = float(report.get("gate_locals_sent", 0))
        extra["gate_mean_mix"] = float(np.mean(list(gate.values())))
        extra["gate_local_fraction"] = float(np.mean([m == 0.0 for m in gate.values()]))
    for key, value in (report.get("diagnostics") or {}).items():
        extra[f"group_{key}"] = float(value)  # group recovery (true groups known)
    row: dict[str, Any] = {
        "round": round_num,
        "mean_accuracy": _mean(values),
        "std_accuracy": float(np.std(values)) if values else None,
        "worst10_accuracy": worst_fraction_mean(values) if values else None,
        "mean_val_accuracy": _mean(vvals),
        "per_client_accuracy": {str(c): a for c, a in acc.items()},
        "per_client_val_accuracy": {str(c): a for c, a in val.items()},
        "test_loss": _mean([e["test"]["loss"] for _, e in sorted(evals.items())]),
        "train_loss": _mean(losses),
        "participants": participants,
        "accepted": report.get("accepted", []),
        "rejected": {str(k): v for k, v in report.get("rejected", {}).items()},
        "failed": {str(k): v for k, v in report.get("failed", {}).items()},
        "stragglers": stragglers,
        "aggregated": aggregated,
        "eval_failed": {str(k): v for k, v in eval_failed.items()},
        "bytes_in": report.get("bytes_in", 0),
        "bytes_out": report.get("bytes_out", 0),
        "seconds": seconds,
        "extra": extra,
    }
    if gate:
        row["gate_mix"] = {str(c): m for c, m in sorted(gate.items())}
    if privacy is not None:
        row["privacy"] = privacy
    return row


def fault_totals(history: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts of every fault event over ``history`` (summary.json ``faults``)."""
    return {
        "failed": sum(len(r.get("failed", {})) for r in history),
        "stragglers": sum(len(r.get("stragglers", [])) for r in history),
        "rejected": sum(len(r.get("rejected", {})) for r in history),
        "eval_failed": sum(len(r.get("eval_failed", {})) for r in history),
        "rounds_not_aggregated": sum(1 for r in history if not r.get("aggregated", True)),
        "actors_replaced": int(sum(r.get("extra", {}).get("actors_replaced", 0) for r in history)),
    }


def summarize(cfg: Config, history: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """summary.json: the last evaluated round's accuracies plus fault and privacy totals."""
    last = next((r for r in reversed(history) if r["mean_accuracy"] is not None), None)
    summary = {
        "strategy": cfg.strategy.name,
        "rounds_completed": len(history),
        "mean_accuracy": last["mean_accuracy"] if last else None,
        "worst10_accuracy": last["worst10_accuracy"] if last else None,
        "std_accuracy": last["std_accuracy"] if last else None,
        "mean_val_accuracy": last["mean_val_accuracy"] if last else None,
        "per_client_accuracy": last["per_client_accuracy"] if last else {},
        "wall_seconds": wall_seconds,
        "faults": fault_totals(history),
    }
    if history and "privacy" in history[-1]:
        summary["privacy"] = history[-1]["privacy"]
    return summary


def round_privacy(cfg: Config, history: Sequence[dict[str, Any]], aggregated: bool) -> dict[str, Any] | None:
    """Privacy spent after this round (rounds that released an aggregate are accounted)."""
    pc = cfg.privacy
    if not pc.enabled:
        return None
    rounds = sum(1 for r in history if r.get("aggregated", True)) + int(aggregated)
    q = cfg.clients_per_round() / cfg.data.num_clients
    return privacy_report(float(pc.clip_norm), pc.noise_multiplier, pc.delta, min(1.0, q), rounds)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- outputs
def _prepare_outputs(ctx: RunContext, ck: ckpt_io.Checkpoint | None) -> None:
    """metrics.jsonl / similarity.jsonl hold exactly rounds 1..R of the checkpoint (none for
    a fresh run): rows written after the last checkpoint by a killed run are dropped."""
    out = ctx.output
    upto = ck.round if ck is not None else 0
    ckpt_io.write_text_atomic(out / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in ctx.history))
    sim = [r for r in _read_rows(out / "similarity.jsonl") if r.get("round", upto + 1) <= upto]
    ckpt_io.write_text_atomic(out / "similarity.jsonl", "".join(json.dumps(r) + "\n" for r in sim))
    (out / "summary.json").unlink(missing_ok=True)
    if ck is None:
        ckpt_io.clear(out / "checkpoints")


def _fetch_and_write(ref: Any, directory: Path, rnd: int, history: list[dict[str, Any]],
                     config: dict[str, Any]) -> Path:
    tensors, layout = ray.get(ref)
    return ckpt_io.write_checkpoint(directory, rnd, tensors, layout, history, config)


def lower_thread_priority(niceness: int = 19) -> None:
    """Make the calling thread yield the CPU to everything else (Linux: threads have their
    own nice value); a no-op elsewhere, where it would renice the whole process."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except OSError:
            pass


class CheckpointWriter:
    """Writes round checkpoints on one background thread, so the file I/O (safetensors,
    fsync, sha256) overlaps the next round. The thread runs at the lowest priority: on a
    machine whose cores are busy training, it takes only the CPU time they leave idle. At
    most one write is in flight: the next :meth:`submit` (or :meth:`wait`) waits for it and
    re-raises its error. A run killed while
    a write is in flight resumes from the previous checkpoint (writes are atomic)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedbip-checkpoint",
                                        initializer=lower_thread_priority)
        self._pending: Future[Path] | None = None

    def submit(self, ctx: RunContext, rnd: int) -> None:
        """Ask the server for its state now (round ``rnd``'s: the server serves calls in the
        order they are sent, so the next round cannot change it first); fetch and write it in
        the background."""
        self.wait()
        ref = ctx.server.state_dict.remote()
        self._pending = self._pool.submit(_fetch_and_write, ref, ctx.output / "checkpoints", rnd,
                                          list(ctx.history), ctx.cfg.to_dict())

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is on disk; its path."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Finish the write in flight (an error is logged: the run is ending anyway)."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - reported, the previous checkpoint stays valid
            log.error("checkpoint write failed: %s", one_line(exc))
        self._pool.shutdown(wait=True)


def _notify_error(callbacks: Sequence[Any], ctx: RunContext, exc: BaseException) -> None:
    for cb in callbacks:
        handler = getattr(cb, "on_error", None)
        if handler is None:
            continue
        try:
            handler(ctx, exc)
        except Exception:  # noqa: BLE001 - the run's own error matters more
            log.warning("on_error of %s failed", type(cb).__name__, exc_info=True)


# ---------------------------------------------------------------------------------- the run
def run_federation(cfg: Config, output: str | Path, resume: bool = False,
                   callbacks: Sequence[RunCallback] = (),
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a federation described by ``cfg``; return ``summary.json``'s content.

    Input problems (config, data, model, checkpoint, resources) raise :class:`ConfigError`
    before any round runs. Everything the driver can check is checked before Ray starts.
    """
    out = Path(output)
    start_wall = time.perf_counter()
    with output_lock(out):
        ck = load_resume_checkpoint(out, cfg) if resume else None
        if resume and ck is None:
            echo(f"no checkpoint in {out}: starting from round 1")
        build_strategy(cfg)
        preflight_model(cfg.model)
        shards = build_shards(cfg.data, cfg.seed, out / "shards")
        if ck is not None and ck.num_clients != shards.num_clients:
            raise ConfigError(f"--resume {out}: checkpoint has {ck.num_clients} clients, "
                              f"the data has {shards.num_clients}")
        ckpt_io.write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        echo(format_summary(shards.summary))
        ensure_ray()
        num_actors = plan_actors(cfg, ray.cluster_resources())
        ctx = RunContext(cfg, out, shards)
        try:
            summary = _run(ctx, ck, num_actors, callbacks, echo, start_wall)
        except BaseException as exc:
            _notify_error(callbacks, ctx, exc)
            raise
        finally:
            if ctx.checkpoints is not None:
                ctx.checkpoints.close()
            _stop_actors(ctx)
    return summary


def _run(ctx: RunContext, ck: ckpt_io.Checkpoint | None, num_actors: int,
         callbacks: Sequence[RunCallback], echo: Callable[[str], None], start_wall: float) -> dict[str, Any]:
    cfg, out = ctx.cfg, ctx.output
    ctx.shard_refs = {cid: ShardRef(cid, ray.put(p.read_bytes())) for cid, p in enumerate(ctx.shards.paths)}
    info = _start_actors(ctx, num_actors)
    if ck is not None:
        mismatch = _layout_mismatch(ck.layout, info["layout"])
        if mismatch:
            raise ConfigError(f"--resume {out}: checkpoint adapter does not match the model ({mismatch})")
        ray.get(ctx.server.load_state_dict.remote(ck.tensors, ck.layout))
        ctx.history, ctx.first_round = list(ck.history), ck.round + 1
        echo(f"resumed from {ck.path.name}: continuing at round {ctx.first_round}")
    else:
        ray.get(ctx.server.initialize.remote(ctx.actors[0].initial_state.remote(), info["layout"]))
    _prepare_outputs(ctx, ck)
    for cb in callbacks:
        cb.on_start(ctx)

    fed = cfg.federation
    writer = ctx.checkpoints = CheckpointWriter()
    for rnd in range(ctx.first_round, fed.rounds + 1):
        row, report = run_round(ctx, rnd, info_size(info))
        ctx.history.append(row)
        _append_line(out / "metrics.jsonl", row)
        if report.get("similarity") is not None:
            _append_line(out / "similarity.jsonl", {"round": rnd, "clients": report["accepted"],
                                                    "similarity": report["similarity"],
                                                    "weights": report["weights"]})
        if fed.checkpoint_due(rnd):
            writer.submit(ctx, rnd)
        for cb in callbacks:
            cb.on_round(ctx, row, report)
        echo(format_round(row, fed.rounds))

    writer.wait()
    summary = summarize(cfg, ctx.history, time.perf_counter() - start_wall)
    ckpt_io.write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    for cb in callbacks:
        cb.on_end(ctx, summary)
    return summary


def run_round(ctx: RunContext, rnd: int, dim: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One round: fit (deadline), aggregate (validated, maybe skipped), heal, evaluate."""
    cfg, fed = ctx.cfg, ctx.cfg.federation
    strategy = build_strategy(cfg)
    t0 = time.perf_counter()
    participants = sample_clients(ctx.shards.num_clients, cfg.clients_per_round(), cfg.seed, rnd)
    opts = strategy.client_options
    clock = PhaseClock()
    fit = fit_phase(ctx, rnd, participants, opts.prox_mu, fed.round_deadline_s, opts.send_gradient,
                    bool(opts.gate_mixes))
    clock.lap("fit")
    need = min_reports(fed.min_report_fraction, len(participants))
    report = ray.get(ctx.server.aggregate_refs.remote(
        rnd, [c for c, _ in fit.done], [r for _, r in fit.done], need))
    report["bytes_out"] = len(participants) * 4 * dim
    if fit.run.orphans:
        report.setdefault("failed", {}).update({c: NO_LIVE_ACTOR for c in fit.run.orphans})
    clock.lap("aggregate")
    if not report.get("aggregated"):
        log.warning("round %d: %d of %d clients sent a valid update (%d needed): aggregation "
                    "skipped, states kept", rnd, len(report["accepted"]), len(participants), need)
    ran_on = fit.run.ran_on
    replaced = heal_actors(ctx, sorted(fit.run.dead | {ran_on[int(c)] for c in report.get("failed", {})
                                                       if int(c) in ran_on}))
    if opts.gate_mixes and report.get("aggregated"):
        report["gate"], sent_local = gate_phase(ctx, rnd, [int(c) for c in report["accepted"]],
                                                opts.gate_mixes, fed.round_deadline_s,
                                                report.get("modified", []), ran_on)
        report["bytes_out"] += 4 * dim * (len(report["accepted"]) + sent_local)  # aggregates (+ locals)
        report["gate_locals_sent"] = sent_local
        clock.lap("gate")
    evals: dict[int, dict[str, dict]] = {}
    eval_failed: dict[int, str] = {}
    if rnd % fed.eval_every == 0 or rnd == fed.rounds:
        evals, eval_failed, more = evaluate_phase(
            ctx, rnd, opts.finetune_epochs_before_eval, fed.round_deadline_s)
        replaced += more
        clock.lap("eval")
    report["phase_seconds"] = clock.laps
    privacy = round_privacy(cfg, ctx.history, bool(report.get("aggregated")))
    row = round_row(rnd, evals, report, participants, fit.stragglers, time.perf_counter() - t0,
                    eval_failed, replaced, privacy)
    return row, report


def _layout_mismatch(saved: dict[str, Any], live: dict[str, Any]) -> str | None:
    from fedbip_ray.core.taskvector import Layout

    return Layout.from_dict(live).first_difference(Layout.from_dict(saved))


def info_size(info: dict[str, Any]) -> int:
    """D from an actor's ``info()`` layout."""
    shapes = info["layout"]["shapes"]
    return int(sum(int(np.prod(s)) if s else 1 for s in shapes))


def format_round(row: dict[str, Any], total: int) -> str:
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
                     f"rejected {len(row['rejected'])} eval-failed {len(row.get('eval_failed', {}))}")
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
        lines.append(f"mean {summary['mean_accuracy']:.3f}  worst10% {summary['worst10_accuracy']:.3f}  "
                     f"({summary['wall_seconds']:.0f}s)")
    return "\n".join(lines)
