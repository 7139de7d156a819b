"""Ray start-up, client-actor sizing and the actors' lifecycle (start, heal, stop)."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import ray

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.runtime.client import ClientActor
from fedbip_ray.runtime.context import RunContext
from fedbip_ray.runtime.messages import ServerSettings
from fedbip_ray.runtime.server import ServerActor

log = logging.getLogger("fedbip.cluster")
TEST_ENV_PREFIX = "FEDBIP_TEST_"  # forwarded to client actors (test-only fault injection)
PING_TIMEOUT_S = 300.0  # how long a restarting actor may take to come back
# errors that mean "the actor's process died" (killed, OOM-killed, crashed), not "the call failed"
PROCESS_DEATH = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError,
                 ray.exceptions.WorkerCrashedError)


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


def ray_address_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that ``address`` (``host:port``, ``ray://host:port``, ``http://host:port``)
    connects to; None for ``auto`` / ``local`` and other forms Ray resolves itself."""
    if address in ("auto", "local") or not address:
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"RAY_ADDRESS={address}: not host:port") from None
    if parts.hostname is None or port is None:
        raise ConfigError(f"RAY_ADDRESS={address}: not host:port")
    return parts.hostname, port


def probe_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """ConfigError (one line) when nothing listens at ``address``, before Ray would retry the
    connection for minutes."""
    endpoint = ray_address_endpoint(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout_s):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({why}); start "
                          "one (ray start --head) or unset RAY_ADDRESS for a local Ray") from None


def preflight_ray() -> None:
    """Check ``RAY_ADDRESS`` (when set and Ray is not connected yet) within seconds."""
    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        probe_ray_address(os.environ["RAY_ADDRESS"])


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
        raise ConfigError(f"resources.num_cpus_per_client={rc.num_cpus_per_client:g}: "
                          f"the Ray cluster has {cpus:g} CPUs")
    fit = math.inf
    if rc.num_cpus_per_client > 0:
        fit = min(fit, cpus // rc.num_cpus_per_client)
    if rc.num_gpus_per_client > 0:
        fit = min(fit, gpus // rc.num_gpus_per_client)
    n = min(cfg.data.num_clients, int(fit) if fit != math.inf else cfg.data.num_clients)
    if rc.max_actors:
        n = min(n, rc.max_actors)
    return max(1, n)


def forwarded_test_env() -> dict[str, str]:
    """The ``FEDBIP_TEST_*`` variables of the driver, forwarded to its client actors."""
    return {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}


def spawn_client(cfg: Config, num_labels: int) -> Any:
    """One client actor with the run's per-client resources."""
    rc = cfg.resources
    opts: dict[str, Any] = {"num_cpus": rc.num_cpus_per_client, "num_gpus": rc.num_gpus_per_client}
    env = forwarded_test_env()
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return ClientActor.options(**opts).remote(cfg.to_dict(), num_labels)


def start_actors(ctx: RunContext, num_actors: int) -> dict[str, Any]:
    """Start the client and server actors; return the first client's ``info()``.

    Raises ConfigError when a client cannot build its model (one line, from the actor).
    """
    assert ctx.strategy is not None, "the run's strategy is built before its actors"
    ctx.actors = [spawn_client(ctx.cfg, ctx.shards.num_labels) for _ in range(num_actors)]
    settings = ServerSettings.from_config(ctx.cfg, ctx.strategy, ctx.shards.groups)
    ctx.server = ServerActor.options(num_cpus=0).remote(settings)
    infos = ray.get([a.info.remote() for a in ctx.actors])
    for info in infos:
        if info.get("error"):
            raise ConfigError(info["error"])
    return infos[0]


def stop_actors(ctx: RunContext) -> None:
    """Kill the run's actors (those already gone are skipped)."""
    for actor in [*ctx.actors, ctx.server]:
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass


def actor_alive(actor: Any, timeout: float) -> bool:
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
        if not actor_alive(ctx.actors[i], PING_TIMEOUT_S):
            log.warning("client actor %d is dead (restarts exhausted): starting a new one", i)
            ctx.actors[i] = spawn_client(ctx.cfg, ctx.shards.num_labels)
            replaced += 1
    return replaced
