"""The three per-client phases of a round, each through :func:`dispatch`: fit (local
training), the validation gate, and evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from fedbip_ray.core.gate import choose_mix, pool_rounds
from fedbip_ray.core.interface import ALAOptions
from fedbip_ray.runtime.cluster import PROCESS_DEATH, heal_actors
from fedbip_ray.runtime.context import RunContext
from fedbip_ray.runtime.dispatch import Call, Dispatch, collect, dispatch, prefetch_states
from fedbip_ray.runtime.server import failure_reason

log = logging.getLogger("fedbip.phases")
Errors = dict[int, BaseException | str]


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
    blocks = getattr(ctx.server, "bounds", None)  # a sharded server's column blocks

    def call(a: int, c: int) -> tuple[Any, Any]:
        args = (c, states[c], rnd, prox_mu, ctx.shard_refs[c], gradient, keep)
        if not blocks:
            return ctx.actors[a].fit_receipt.remote(*args)
        refs = ctx.actors[a].fit_receipt.options(num_returns=1 + len(blocks)).remote(
            *args, blocks=blocks)
        return refs[0], list(refs[1:])  # each shard gets its slice straight from the client

    run = dispatch(ctx, participants, call, deadline_s, phase="fit")
    if run.late:
        log.warning("round %d: stragglers past the %.3gs deadline: %s", rnd, deadline_s, run.late)
    if run.orphans:
        log.warning("round %d: every client actor died; not started: %s", rnd, run.orphans)
    done = [(c, run.done[c][0]) for c in participants if c in run.done]
    return FitOutcome(done, run)


def _log_gate_errors(rnd: int, errors: Errors) -> None:
    for cid, err in errors.items():
        log.warning("round %d: validation gate of client %d failed (%s): aggregate kept", rnd, cid,
                    err if isinstance(err, str) else failure_reason(err))


@dataclass(frozen=True)
class GateOutcome:
    """The λ each scored client chose, its scores this round (one ``{accuracy, n}`` per mix)
    and how many times the server sent a client's ``local`` state."""

    chosen: dict[int, float]
    scores: dict[int, list[dict[str, float]]]
    locals_sent: int


def gate_phase(ctx: RunContext, rnd: int, clients: Sequence[int], mixes: tuple[float, ...],
               deadline_s: float, send_local: Sequence[int] = (),
               ran_on: Mapping[int, int] | None = None, memory: float = 0.0,
               past: Mapping[int, list[list[dict[str, float]]]] | None = None,
               ties: str = "aggregate") -> GateOutcome:
    """Validation gate (:mod:`fedbip_ray.core.gate`): every aggregated client scores
    ``local + λ (aggregate − local)`` for each ``λ`` on its validation split; the server keeps
    the best, read from this round's scores pooled with the client's ``past`` rounds' (oldest
    first) by ``memory``, exact accuracy ties broken as ``ties`` says. The actor that ran the
    client's ``fit`` (``ran_on``) kept ``local``;
    the server sends it only to the clients in ``send_local`` (their task vector was clipped)
    and to those whose call landed on an actor without it (restarted, or another actor took the
    call). A client whose scoring fails or misses the deadline keeps its aggregate."""
    assert ctx.server is not None
    server = ctx.server
    kept_on = dict(ran_on) if ran_on is not None else {c: ctx.actor_index(c) for c in clients}
    sent: list[int] = []  # clients sent ``local``, once per send
    resend = set(send_local)

    def call(with_local: bool) -> Call:
        def run(a: int, c: int) -> tuple[Any, Any]:
            local = None
            if with_local or c in resend or kept_on.get(c) != a:  # (another actor took the call)
                local = server.gate_local.remote(c)
                sent.append(c)
            ref = ctx.actors[a].score_mixes.remote(c, states[c], mixes, rnd, ctx.shard_refs[c],
                                                   local)
            return ref, ref
        return run

    t0 = time.monotonic()
    states = prefetch_states(ctx, clients)
    scores, errors = collect(dispatch(ctx, clients, call(False), deadline_s, kept_on, "gate"),
                             deadline_s)
    lost = [c for c, s in scores.items() if s is None]
    if lost:  # the actor no longer holds the client's trained state: send it
        left = max(1.0, deadline_s - (time.monotonic() - t0))
        again, errors2 = collect(dispatch(ctx, lost, call(True), left, kept_on), deadline_s)
        scores = {**{c: s for c, s in scores.items() if s is not None}, **again}
        errors.update(errors2)
    _log_gate_errors(rnd, errors)
    scored = {cid: [dict(x) for x in s] for cid, s in scores.items() if s is not None}
    past = past or {}
    chosen = {cid: choose_mix(pool_rounds([*past.get(cid, []), s], memory), mixes, ties)
              for cid, s in scored.items()}
    ray.get(server.apply_gate.remote(chosen))
    return GateOutcome(chosen, scored, len(sent))


def _kept_local_call(ctx: RunContext, method: str, make_args: Any, sent: list[int],
                     resend: set[int], kept_on: Mapping[int, int], with_local: bool) -> Call:
    """A call of a two-result actor ``method(*make_args(c), local)`` (its payload: both refs)
    whose ``local`` (the client's own trained state) the server sends only when needed (see
    :func:`gate_phase`)."""
    assert ctx.server is not None
    server = ctx.server

    def run(a: int, c: int) -> tuple[Any, Any]:
        local = None
        if with_local or c in resend or kept_on.get(c) != a:
            local = server.gate_local.remote(c)
            sent.append(c)
        receipt, payload = getattr(ctx.actors[a], method).remote(*make_args(c), local)
        return receipt, (receipt, payload)
    return run


def ala_phase(ctx: RunContext, rnd: int, clients: Sequence[int], opts: ALAOptions,
              deadline_s: float, send_local: Sequence[int] = (),
              ran_on: Mapping[int, int] | None = None) -> dict[str, float]:
    """FedALA (:mod:`fedbip_ray.core.fedala`): every aggregated client learns its weights W on
    its train data from its own trained state and its aggregate (the global model) on the
    actor that ran its ``fit`` (which kept the trained state; else the server sends it), and
    the server keeps ``θ + (g − θ) ⊙ W`` as its state and W in its memory. A client whose call
    fails or misses the deadline keeps the global model. Returns diagnostics
    (``ala_clients``, ``ala_mean_epochs``, ``ala_mean_weight``, ``ala_locals_sent``)."""
    assert ctx.server is not None
    server = ctx.server
    kept_on = dict(ran_on) if ran_on is not None else {c: ctx.actor_index(c) for c in clients}
    sent: list[int] = []
    t0 = time.monotonic()
    states = prefetch_states(ctx, clients)
    weights = {c: server.ala_weights.remote(c) for c in clients}

    def args(c: int) -> tuple[Any, ...]:
        return (c, states[c], weights[c], rnd, opts, ctx.shard_refs[c])

    def run(pending: Sequence[int], with_local: bool, left: float) -> tuple[dict, dict]:
        call = _kept_local_call(ctx, "adapt_local", args, sent, set(send_local), kept_on,
                                with_local)
        out = dispatch(ctx, pending, call, left, kept_on, "ala")
        receipts, payloads = {}, {}
        for c, ((receipt, payload), error) in out.done.items():
            if error is None:
                receipts[c], payloads[c] = ray.get(receipt), payload
        return receipts, payloads

    receipts, payloads = run(clients, False, deadline_s)
    lost = [c for c, r in receipts.items() if r is None]
    if lost:
        left = max(1.0, deadline_s - (time.monotonic() - t0))
        again, more = run(lost, True, left)
        receipts.update(again)
        payloads.update(more)
    ids = [c for c in clients if receipts.get(c) is not None]
    if ids:
        ray.get(server.apply_ala.remote(rnd, ids, [payloads[c] for c in ids]))
    failed = sorted(set(clients) - set(ids))
    if failed:
        log.warning("round %d: adaptive local aggregation failed for clients %s: global model "
                    "kept", rnd, failed)
    epochs = [receipts[c][0] for c in ids]
    mean_w = [receipts[c][1] for c in ids if receipts[c][1] == receipts[c][1]]
    return {"ala_clients": float(len(ids)),
            "ala_mean_epochs": float(sum(epochs) / len(epochs)) if epochs else float("nan"),
            "ala_mean_weight": float(sum(mean_w) / len(mean_w)) if mean_w else float("nan"),
            "ala_locals_sent": float(len(sent))}


def _eval_pass(ctx: RunContext, rnd: int, clients: Sequence[int], finetune_epochs: int,
               deadline_s: float) -> tuple[dict[int, dict], Errors, Dispatch]:
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
    failures = {c: e if isinstance(e, str) else failure_reason(e)
                for c, e in sorted(errors.items())}
    for cid, why in failures.items():
        log.warning("round %d: evaluation of client %d failed: %s", rnd, cid, why)
    return results, failures, replaced


