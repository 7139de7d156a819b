"""The run's frozen base model in Ray's object store, once per run (and so once per node).

The driver (which never imports torch) starts one zero-CPU task that builds the base model and
returns it as a :class:`~fedbip_ray.models.shared_base.FrozenBase`; Ray keeps that result in
the object store of the node the task ran on, owned by the driver. Every client actor gets a
:class:`BaseHandle` and fetches it itself: on the same node the parameter arrays map zero-copy,
read-only; an actor on another node pulls one copy into its own node's store, which the other
actors there then share. The task's worker exits after the call (``max_calls=1``), so no
process keeps a private copy. An actor that cannot fetch the base (or whose trainer cannot use
it) loads a private copy, as every actor does with ``resources.share_base_model: false``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.runtime.acquire import actor_options

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from fedbip_ray.models.shared_base import FrozenBase

log = logging.getLogger("fedbip.base_store")
# what a base that cannot be built raises: the actors' own private load then reports it
_BUILD_ERRORS = (ConfigError, OSError, ValueError, KeyError, ImportError)


@dataclass(frozen=True)
class BaseHandle:
    """The ObjectRef of the run's :class:`FrozenBase` (None when it could not be built),
    nested in a dataclass so that Ray hands an actor the reference, not the value: the actor
    fetches it itself and falls back to a private copy if that fails."""

    ref: Any  # ray.ObjectRef


@ray.remote(num_cpus=0, max_calls=1)
def _build_base(cfg: Config, num_labels: int) -> FrozenBase | None:
    """The base model of ``cfg`` as a FrozenBase; None when it cannot be built."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedbip_ray.models.shared_base import build_frozen_base

    try:
        return build_frozen_base(cfg, num_labels)
    except _BUILD_ERRORS:
        return None


def private_reason(cfg: Config) -> str | None:
    """Why this run's client actors load private copies of the base (None: they share)."""
    rc = cfg.resources
    if not rc.share_base_model:
        return "resources.share_base_model is false"
    if rc.num_gpus_per_client > 0 or rc.device == "cuda":
        return "the client actors train on GPUs, each holds its base weights on its device"
    return None


def put_base(cfg: Config, num_labels: int,
             group: PlacementGroup | None = None) -> BaseHandle | None:
    """Start building the run's shared base (in bundle 0 of ``group`` when given, i.e. on the
    first actor's node); None, with one log line saying why, when the actors load their own."""
    why = private_reason(cfg)
    if why is not None:
        log.info("base model: one private copy per client actor (%s)", why)
        return None
    opts = actor_options(group, 0)
    return BaseHandle(_build_base.options(**opts).remote(cfg, num_labels))


def fetch_base(handle: BaseHandle | None) -> FrozenBase | None:
    """Inside a client actor: the run's FrozenBase (zero-copy on its node), or None (then
    the actor loads a private copy; one warning line when the fetch itself failed)."""
    if handle is None:
        return None
    try:
        return ray.get(handle.ref)
    except Exception as exc:  # noqa: BLE001 - any failure only costs memory
        text = str(exc).strip().splitlines()
        log.warning("base model: a private copy (the shared base could not be fetched: %s)",
                    text[-1] if text else type(exc).__name__)
        return None
