"""The dispatcher: runs one call per client over the client actors, at most one in flight per
actor, in the order of the pure policy in :mod:`fedbip_ray.runtime.scheduling`, with a
deadline. The driver fetches only small receipts; payloads stay in the object store."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from fedbip_ray.runtime.cluster import PROCESS_DEATH
from fedbip_ray.runtime.context import RunContext
from fedbip_ray.runtime.scheduling import home_queues, take_next

NO_LIVE_ACTOR = "no live client actor left in this phase"  # why a never-started call failed
Call = Callable[[int, int], tuple[Any, Any]]  # (actor index, client) -> (receipt, payload) refs


def cancel(refs: Sequence[Any]) -> None:
    """Cancel calls past the deadline (the actor stops them at its next batch); a list is a
    call's several results."""
    for r in [x for ref in refs for x in (ref if isinstance(ref, list) else [ref])]:
        try:
            ray.cancel(r)
        except Exception:  # noqa: BLE001 - e.g. its actor is already gone
            pass


def prefetch_states(ctx: RunContext, clients: Sequence[int]) -> dict[int, Any]:
    """Refs of the clients' current states, asked from the server actor up front, so that a
    call dispatched later does not wait for a server round trip."""
    assert ctx.server is not None
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


def _receive(out: Dispatch, receipt: Any, c: int, a: int, payload: Any, t0: float) -> None:
    """Record one finished call (its receipt's error, or its seconds)."""
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


def dispatch(ctx: RunContext, clients: Sequence[int], call: Call, deadline_s: float,
             prefer: Mapping[int, int] | None = None, phase: str | None = None) -> Dispatch:
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
    inflight: dict[Any, tuple[int, int, Any, float]] = {}  # receipt -> (client, actor, payload, t0)
    deadline = time.monotonic() + deadline_s
    if ctx.progress is not None and phase:
        ctx.progress.start(ctx.round, phase, len(clients))
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
            _receive(out, receipt, c, a, payload, t0)
            if a not in out.dead:
                free.append(a)
        if ctx.progress is not None and phase and ready:
            ctx.progress.update(len(out.done))
        if not ready:
            break  # the deadline passed
    if ctx.progress is not None and phase:
        ctx.progress.finish()
    if cost is not None:
        cost.update(out.seconds)
    cancel([payload for _, _, payload, _ in inflight.values()] + list(inflight))
    queued = [c for q in queues.values() for c in q]
    all_dead = len(out.dead) == len(ctx.actors)
    out.late = sorted([c for c, _, _, _ in inflight.values()] + ([] if all_dead else queued))
    out.orphans = sorted(queued) if all_dead else []
    return out


def collect(run: Dispatch,
            deadline_s: float) -> tuple[dict[int, Any], dict[int, BaseException | str]]:
    """(results, errors) of a :func:`dispatch` of calls with small results: an error is the
    call's Ray error, or a string for a call past the deadline or never started."""
    results: dict[int, Any] = {}
    errors: dict[int, BaseException | str] = {c: f"past the {deadline_s:.3g}s deadline"
                                              for c in run.late}
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
