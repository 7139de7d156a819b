"""Warm client actors kept between the runs of one driver process (opt-in).

A client actor's start is mostly imports (torch, transformers, peft) and the base model's load:
seconds on a laptop, minutes for a large model on a GPU node. Inside :func:`reuse_actors`, a
run that ends normally leaves its client actors alive in this process's pool, and the next run
whose actors have the same shape (:class:`PoolKey`) takes them and sends each a ``reset`` with
its own config (the actor rebuilds its trainer and forgets every cached shard and state).
The shared frozen base (:mod:`fedbip_ray.runtime.base_store`) is kept too, for runs whose
model config, seed and label count are the same: a model directory is read once per block.

Only actors outside any placement group are pooled: the embedded local Ray, not a joined
cluster (whose bundles the autoscaler sizes per run) and not a Tune trial. A pooled actor that
Ray restarts after a crash builds from the config of its last ``reset``, which it keeps in
Ray's key-value store (:func:`remember_config`), not from its first run's constructor arguments.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.experimental import internal_kv

log = logging.getLogger(__name__)

_NAMESPACE = "fedbip_actor_config"


@dataclass(frozen=True)
class PoolKey:
    """What makes a pooled actor fit a run: the Ray session it lives in, how many actors, the
    per-actor resources and the environment variables its runtime env carries."""

    session: str
    num_actors: int
    num_cpus: float
    num_gpus: float
    env: tuple[tuple[str, str], ...]


@dataclass
class _Pool:
    key: PoolKey | None = None
    actors: tuple[Any, ...] = ()
    base_key: bytes | None = None  # what the kept base was built from
    base: Any = None  # its handle (fedbip_ray.runtime.base_store.BaseHandle)


_pool: _Pool | None = None  # None: reuse is off in this process


@contextmanager
def reuse_actors() -> Iterator[None]:
    """Runs inside this block reuse the client actors of the previous run when their shape
    fits; on leaving the outermost block the pooled actors are killed."""
    global _pool
    if _pool is not None:  # nested: the outer block owns the pool
        yield
        return
    _pool = _Pool()
    try:
        yield
    finally:
        pool, _pool = _pool, None
        stop(pool.actors)


def enabled() -> bool:
    """Whether this process is inside :func:`reuse_actors`."""
    return _pool is not None


def take(key: PoolKey | None) -> list[Any] | None:
    """The pooled actors if they fit ``key`` (the pool is then empty), else None after killing
    any that do not fit (they hold resources the new run's actors need)."""
    if _pool is None or not _pool.actors:
        return None
    actors, fits = _pool.actors, key is not None and _pool.key == key
    _pool.key, _pool.actors = None, ()
    if fits:
        return list(actors)
    stop(actors)
    return None


def release() -> None:
    """Kill the pooled actors (if any): whatever starts actors of its own calls this first, so
    warm actors never hold the resources it waits for."""
    take(None)


def keep(key: PoolKey | None, actors: Sequence[Any]) -> bool:
    """Pool ``actors`` under ``key`` for the next run; False (nothing kept) when reuse is off
    or the actors cannot be pooled (``key`` None). The caller then kills them."""
    if _pool is None or key is None or not actors:
        return False
    release()
    _pool.key, _pool.actors = key, tuple(actors)
    return True


def shared_base(built_from: bytes, build: Callable[[], Any]) -> Any:
    """The frozen base handle ``build()`` gives, kept for the next run whose base is built from
    the same ``built_from`` (the pickled model config, seed and label count); without reuse,
    a fresh ``build()``. Only the latest base is kept."""
    if _pool is None:
        return build()
    if _pool.base_key != built_from:
        _pool.base_key, _pool.base = built_from, build()
    return _pool.base


def stop(actors: Sequence[Any]) -> None:
    """Kill ``actors`` (those already gone are skipped) and forget their kept configs."""
    for actor in actors:
        try:
            internal_kv._internal_kv_del(actor._actor_id.hex(), namespace=_NAMESPACE)
        except Exception:  # noqa: BLE001 - Ray already shut down: nothing left to clean
            pass
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def remember_config(args: tuple[Any, ...]) -> None:
    """Inside an actor: keep ``args`` (its latest constructor arguments) where a restart of
    this actor finds them."""
    actor_id = ray.get_runtime_context().get_actor_id()
    internal_kv._internal_kv_put(actor_id, pickle.dumps(args), overwrite=True,
                                 namespace=_NAMESPACE)


def recalled_config(default: tuple[Any, ...]) -> tuple[Any, ...]:
    """Inside an actor: the arguments of its latest ``reset`` when Ray restarted it after one,
    else ``default`` (the constructor's own)."""
    ctx = ray.get_runtime_context()
    if not ctx.was_current_actor_reconstructed:
        return default
    raw = internal_kv._internal_kv_get(ctx.get_actor_id(), namespace=_NAMESPACE)
    if raw is None:
        return default
    log.info("restarted pooled actor: building from its last reset's config")
    return tuple(pickle.loads(raw))
