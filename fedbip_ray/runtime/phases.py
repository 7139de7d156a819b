"""The three per-client phases of a round, each through :func:`dispatch`: fit (local
training), the validation gate, and evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from fedbip_ray.core.gate import choose_mix
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
    chosen = {cid: choose_mix(s, mixes) for cid, s in scores.items() if s is not None}
    ray.get(server.apply_gate.remote(chosen))
    return chosen, len(sent)


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


