"""Dynamic dispatch of per-client calls (``federation.dispatch``) on real Ray actors: a free
actor steals queued clients from a busy one, a dead actor takes no more calls, deadlines
cancel what is still running."""

from __future__ import annotations

import os
import time

import pytest
import ray

from fedbip_ray.config import config_from_dict
from fedbip_ray.runtime.cluster import PROCESS_DEATH
from fedbip_ray.runtime.context import RunContext
from fedbip_ray.runtime.dispatch import collect, dispatch

from ..conftest import tiny_config

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0, max_restarts=0)
class Sleeper:
    def work(self, client: int, seconds: float, die: bool = False) -> int:
        if die:
            os._exit(1)
        time.sleep(seconds)
        return client


def _ctx(n_actors: int) -> RunContext:
    ctx = RunContext(config_from_dict(tiny_config()), output=None, shards=None)  # type: ignore[arg-type]
    ctx.actors = [Sleeper.remote() for _ in range(n_actors)]
    ray.get([a.work.remote(-1, 0.0) for a in ctx.actors])  # started (not counted in deadlines)
    return ctx


def _call(ctx: RunContext, seconds: dict[int, float], die: set[int] = frozenset()):
    def call(a: int, c: int):
        ref = ctx.actors[a].work.remote(c, seconds[c], c in die)
        return ref, ref
    return call


def test_an_idle_actor_takes_the_busy_actors_queued_clients(ray_local):
    # homes: clients 0, 2 -> actor 0 (slow), clients 1, 3, 5 -> actor 1 (fast)
    ctx = _ctx(2)
    seconds = {0: 1.5, 1: 0.05, 2: 1.5, 3: 0.05, 4: 1.5, 5: 0.05}
    run = dispatch(ctx, list(seconds), _call(ctx, seconds), deadline_s=60)
    results, errors = collect(run, 60)
    assert results == {c: c for c in seconds} and errors == {}
    assert run.ran_on[0] == 0 and {run.ran_on[c] for c in (1, 3, 5)} == {1}
    # actor 1 ran out of its own clients while actor 0 was on client 0: it took the last queued
    assert run.ran_on[4] == 1 and run.late == [] and run.dead == set()


def test_a_dead_actor_takes_no_more_calls_and_the_rest_run_elsewhere(ray_local):
    ctx = _ctx(2)
    seconds = {0: 0.3, 1: 0.0, 2: 0.3, 3: 0.0}
    run = dispatch(ctx, list(seconds), _call(ctx, seconds, die={1}), deadline_s=60)
    results, errors = collect(run, 60)
    assert run.dead == {1} and isinstance(errors[1], PROCESS_DEATH)
    assert results == {0: 0, 2: 2, 3: 3} and run.ran_on[3] == 0


def test_every_actor_dead_leaves_the_rest_unstarted(ray_local):
    ctx = _ctx(1)
    seconds = {0: 0.0, 1: 0.0}
    run = dispatch(ctx, [0, 1], _call(ctx, seconds, die={0}), deadline_s=60)
    results, errors = collect(run, 60)
    assert run.dead == {0} and run.orphans == [1] and results == {}
    assert errors[1] == "no live client actor left in this phase"


def test_calls_past_the_deadline_are_late_and_cancelled(ray_local):
    ctx = _ctx(1)
    seconds = {0: 0.0, 1: 30.0, 2: 0.0}
    t0 = time.monotonic()
    run = dispatch(ctx, [0, 1, 2], _call(ctx, seconds), deadline_s=3.0)
    assert time.monotonic() - t0 < 20.0  # returned at the deadline, not after client 1's 30 s
    results, errors = collect(run, 3.0)
    assert results == {0: 0} and run.late == [1, 2]
    assert errors[1] == errors[2] == "past the 3s deadline"


def test_the_second_phase_runs_longest_first_from_the_first_phases_seconds(ray_local):
    # homes: 0, 2, 4 -> actor 0; 1, 3, 5 -> actor 1. Client 4 is the slow one.
    ctx = _ctx(2)
    seconds = {0: 0.3, 1: 0.3, 2: 0.3, 3: 0.3, 4: 1.2, 5: 0.4}
    first = dispatch(ctx, list(seconds), _call(ctx, seconds), deadline_s=60, phase="fit")
    took = ctx.call_seconds["fit"]
    assert set(took) == set(seconds) and took == first.seconds
    assert all(took[c] >= s for c, s in seconds.items()) and took[4] > max(took[c] for c in (0, 2))
    assert all(first.ran_on[c] == c % 2 for c in seconds)  # client order: 4 came last on actor 0
    second = dispatch(ctx, list(seconds), _call(ctx, seconds), deadline_s=60, phase="fit")
    assert collect(second, 60)[1] == {}
    # actor 0 starts with client 4 (longest); actor 1, done with its own, takes one of 0 and 2
    assert second.ran_on[4] == 0 and 1 in {second.ran_on[0], second.ran_on[2]}
