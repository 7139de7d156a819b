"""Ray start-up, client-actor sizing and the actors' lifecycle (start, heal, stop).

:func:`provision` sizes the client actors: on the embedded local Ray by what it has now
(:func:`plan_actors`); on a cluster this process joined (``RAY_ADDRESS``, ``ray job submit``)
by what the cluster could ever hold, reserving one bundle per actor in a placement group that
the autoscaler scales up for (:mod:`fedbip_ray.runtime.acquire`); inside a Ray Tune trial by
the trial's own reservation. Actor ``i`` lives in bundle ``i``; :class:`Placement` also keeps
where each actor runs (node id, device, assigned GPUs) for the metrics rows.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.runtime import actor_pool
from fedbip_ray.runtime.acquire import (
    ClusterLimits,
    acquire_bundles,
    actor_options,
    bundle_shape,
    cluster_limits,
    plan_num_actors,
    release_bundles,
)
from fedbip_ray.runtime.base_store import BaseHandle, put_base
from fedbip_ray.runtime.client import ClientActor
from fedbip_ray.runtime.context import RunContext
from fedbip_ray.runtime.messages import ServerSettings
from fedbip_ray.runtime.server import ServerActor, failure_reason
from fedbip_ray.storage import Location, provider_env

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
    cpus -= server_share(cfg, resources)
    fit = math.inf
    if rc.num_cpus_per_client > 0:
        fit = min(fit, cpus // rc.num_cpus_per_client)
    if rc.num_gpus_per_client > 0:
        fit = min(fit, gpus // rc.num_gpus_per_client)
    if rc.num_actors is not None:
        if rc.num_actors > fit:
            raise ConfigError(f"resources.num_actors={rc.num_actors}: the Ray cluster holds at "
                              f"most {int(fit)} client actors ({cpus:g} CPUs, {gpus:g} GPUs)")
        return min(rc.num_actors, cfg.data.num_clients)
    n = min(cfg.data.num_clients, int(fit) if fit != math.inf else cfg.data.num_clients)
    if rc.max_actors:
        n = min(n, rc.max_actors)
    return max(1, n)


def server_share(cfg: Config, resources: Mapping[str, float], where: str = "Ray cluster") -> float:
    """The CPUs the server actor takes from ``resources`` (``resources.server_cpus``); raises
    ConfigError (one line) when the server and one client actor cannot fit together, or the
    server's memory reservation exceeds what ``resources`` has."""
    rc, k = cfg.resources, cfg.federation.server_shards
    cpus, server = float(resources.get("CPU", 0)), float(rc.server_cpus) * k
    actors = f"{k} server shards" if k > 1 else "the server"
    if server + rc.num_cpus_per_client > cpus:
        raise ConfigError(f"resources.server_cpus={rc.server_cpus:g}: {actors} and one client "
                          f"actor (resources.num_cpus_per_client={rc.num_cpus_per_client:g}) "
                          f"need {server + rc.num_cpus_per_client:g} CPUs, the {where} has "
                          f"{cpus:g}")
    memory = float(resources.get("memory", math.inf))
    if rc.server_memory_gb is not None and rc.server_memory_gb * k * 2**30 > memory:
        raise ConfigError(f"resources.server_memory_gb={rc.server_memory_gb:g}: {actors} need "
                          f"{rc.server_memory_gb * k:g} GiB, the {where} has "
                          f"{memory / 2**30:.1f} GiB of memory for actors")
    return server


def driver_node_resources() -> dict[str, float]:
    """The total resources of the node this driver runs on (where the server actor lives)."""
    me = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == me:
            return {k: float(v) for k, v in node.get("Resources", {}).items()}
    return {}


def check_server_fits(cfg: Config) -> None:
    """On a joined cluster the server actor is pinned to the driver's node: its CPUs and
    memory must fit there (ConfigError, one line)."""
    rc = cfg.resources
    if rc.server_cpus == 0 and rc.server_memory_gb is None:
        return
    node = driver_node_resources()
    cpus = node.get("CPU", 0.0)
    if rc.server_cpus > cpus:
        raise ConfigError(f"resources.server_cpus={rc.server_cpus:g}: the server actor runs on "
                          f"the driver's node, which has {cpus:g} CPUs")
    memory = node.get("memory", math.inf)
    if rc.server_memory_gb is not None and rc.server_memory_gb * 2**30 > memory:
        raise ConfigError(f"resources.server_memory_gb={rc.server_memory_gb:g}: the server "
                          f"actor runs on the driver's node, which has {memory / 2**30:.1f} GiB")


@dataclass
class Placement:
    """Where a run's client actors run.

    ``num_actors``: how many. ``group``: their placement group, actor ``i`` in bundle ``i``
    (None without one: the embedded local Ray, or inside a Tune trial's own group). ``where``:
    each actor index's ``node_id/device`` (see :func:`describe_where`) as last seen.
    """

    num_actors: int
    group: PlacementGroup | None = None
    where: dict[int, str] = field(default_factory=dict)

    def of_clients(self, ran_on: Mapping[int, int]) -> dict[str, str]:
        """``{client: node_id/device}`` for ``ran_on`` (client -> actor index)."""
        return {str(c): self.where.get(a, "unknown") for c, a in sorted(ran_on.items())}


def describe_where(node_id: str, device: str | None, gpu_ids: Sequence[str]) -> str:
    """``node_id/device``, plus the GPUs Ray assigned when there are any:
    ``<node id>/cpu (GPU 0)`` is an actor given GPU 0 that trains on CPU."""
    text = f"{node_id}/{device or 'none'}"
    return f"{text} (GPU {','.join(gpu_ids)})" if gpu_ids else text


def actor_gpu_ids(actor: Any, info: Mapping[str, Any]) -> list[str]:
    """The GPU ids Ray assigned ``actor``: ``info["gpu_ids"]`` when the actor reports them,
    else the GCS actor table's resource mapping ([] when unknown)."""
    if info.get("gpu_ids") is not None:
        return [str(g) for g in info["gpu_ids"]]
    try:
        from ray.core.generated import gcs_pb2

        accessor = ray._private.state.state._connect_and_get_accessor()
        data = gcs_pb2.ActorTableData.FromString(accessor.get_actor_info(actor._actor_id))
    except Exception:  # noqa: BLE001 - private API: the ids are a diagnostic only
        return []
    ids = {int(r.index) for m in data.resource_mapping
           if m.name == "GPU" or m.name.startswith("GPU_group_") for r in m.resource_ids}
    return [str(i) for i in sorted(ids)]


def joined_cluster() -> bool:
    """Whether the connected Ray was started elsewhere (``RAY_ADDRESS``, ``ray job submit``)
    rather than by this process (the embedded local Ray)."""
    node = getattr(ray._private.worker, "_global_node", None)
    return not bool(getattr(node, "head", False))


def joined_limits(cfg: Config) -> ClusterLimits | None:
    """What a joined cluster could ever provide for the clients' bundle (autoscaler included);
    None on the embedded local Ray. Ray must be connected."""
    if not joined_cluster():
        return None
    rc = cfg.resources
    return cluster_limits(bundle_shape(rc.num_cpus_per_client, rc.num_gpus_per_client))


def provision(cfg: Config, num_clients: int,
              echo: Callable[[str], None] = print) -> Placement:
    """Connect to Ray and size (and, on a joined cluster, reserve) the client actors.

    Embedded local Ray: :func:`plan_actors` on what it has. Inside a Tune trial: the actors the
    trial reserved (``resources.max_actors``). A joined cluster: ``plan_num_actors`` on what it
    could ever hold, then ``acquire_bundles`` (the autoscaler's request; progress lines via
    ``echo``). Raises a one-line ConfigError when the actors could never, or did not within
    ``resources.acquire_timeout_s``, get their resources.
    """
    ensure_ray()
    rc = cfg.resources
    if get_current_placement_group() is not None:  # a Tune trial: actors go into its group
        n = rc.max_actors or rc.num_actors or plan_actors(cfg, ray.cluster_resources())
        return Placement(max(1, min(num_clients, n)))
    limits = joined_limits(cfg)
    if limits is None:
        return Placement(plan_actors(cfg, ray.cluster_resources()))
    check_server_fits(cfg)
    bundle = bundle_shape(rc.num_cpus_per_client, rc.num_gpus_per_client)
    n = plan_num_actors(num_clients, bundle, limits, requested=rc.num_actors,
                        max_actors=rc.max_actors)
    group = acquire_bundles(n, rc.num_cpus_per_client, rc.num_gpus_per_client,
                            timeout_s=rc.acquire_timeout_s, echo=echo, limits=limits)
    return Placement(n, group)


def forwarded_test_env() -> dict[str, str]:
    """The ``FEDBIP_TEST_*`` variables of the driver, forwarded to its client actors."""
    return {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}


def spawn_client(cfg: Config, num_labels: int, placement: Placement | None = None,
                 index: int = 0, base: BaseHandle | None = None) -> Any:
    """One client actor with the run's per-client resources (in bundle ``index`` of the
    placement's group, when there is one), over the shared frozen base ``base`` if given."""
    actor_pool.release()  # warm actors of an earlier run must not hold what this one needs
    rc = cfg.resources
    opts: dict[str, Any] = {"num_cpus": rc.num_cpus_per_client, "num_gpus": rc.num_gpus_per_client}
    env = forwarded_test_env()
    if env:
        opts["runtime_env"] = {"env_vars": env}
    if placement is not None:
        opts.update(actor_options(placement.group, index))
    actor = ClientActor.options(**opts).remote(cfg, num_labels, base is not None)
    if base is not None:
        actor.use_base.remote(base)  # runs before any later call of this driver
    return actor


def reset_warm(actors: Sequence[Any], cfg: Config, num_labels: int,
               base: BaseHandle | None) -> list[Any] | None:
    """Pooled client actors set up for this run, like :func:`spawn_client`'s new ones; None
    (after stopping them all, one warning line) when one of them does not answer."""
    try:
        ray.get([a.reset.remote(cfg, num_labels, base is not None) for a in actors],
                timeout=PING_TIMEOUT_S)
    except ray.exceptions.RayError as exc:
        log.warning("warm client actors unusable (%s): starting new ones", failure_reason(exc))
        actor_pool.stop(actors)
        return None
    if base is not None:
        for actor in actors:
            actor.use_base.remote(base)
    return list(actors)


def pool_key(cfg: Config, placement: Placement) -> actor_pool.PoolKey | None:
    """The shape a pooled actor must have to serve this run; None when its actors cannot be
    pooled (they live in a placement group: a joined cluster or a Tune trial)."""
    if placement.group is not None or get_current_placement_group() is not None:
        return None
    rc = cfg.resources
    return actor_pool.PoolKey(ray.get_runtime_context().get_session_name(), placement.num_actors,
                              rc.num_cpus_per_client, rc.num_gpus_per_client,
                              tuple(sorted(forwarded_test_env().items())))


def driver_node() -> NodeAffinitySchedulingStrategy:
    """Scheduling on the driver's node (the head under ``ray job submit``): the server actor
    holds every client's state, so it must not live on a worker node that can be lost. Hard
    affinity: with a soft one Ray 2.60 may place a zero-CPU actor on another node although the
    driver's node is alive."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _record_where(placement: Placement, index: int, actor: Any, info: Mapping[str, Any]) -> None:
    placement.where[index] = describe_where(str(info.get("node_id") or "unknown"),
                                            info.get("device"), actor_gpu_ids(actor, info))


def server_options(cfg: Config, output: Location | None) -> dict[str, Any]:
    """The server actor's Ray options: ``resources.server_cpus`` / ``server_memory_gb`` on
    the driver's node; the storage-provider variables when it writes to a remote output."""
    rc = cfg.resources
    opts: dict[str, Any] = {"num_cpus": rc.server_cpus, "scheduling_strategy": driver_node()}
    if rc.server_memory_gb is not None:
        opts["memory"] = int(rc.server_memory_gb * 2**30)
    env = provider_env() if output is not None and not output.is_local else {}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def spawn_server(ctx: RunContext) -> Any:
    """The run's server actor: writes each round's matrices to the run's output, runs its
    BLAS on ``max(1, int(resources.server_cpus))`` threads. With
    ``federation.server_shards: K > 1`` a :class:`~fedbip_ray.runtime.sharded.ShardedServer`
    (K block actors spread over the nodes, each with those CPUs and memory, and a
    coordinator on the driver's node)."""
    assert ctx.strategy is not None
    output = ctx.outputs.location if ctx.outputs is not None else None
    settings = ServerSettings.from_config(ctx.cfg, ctx.strategy, ctx.shards.groups, output)
    threads = max(1, int(ctx.cfg.resources.server_cpus))
    opts = server_options(ctx.cfg, output)
    shards = ctx.cfg.federation.server_shards
    if shards > 1:
        from fedbip_ray.runtime.sharded import ShardedServer

        coordinator = {**opts, "num_cpus": 0}
        coordinator.pop("memory", None)
        return ShardedServer(settings, shards, threads, {**opts, "scheduling_strategy": "SPREAD"},
                             coordinator)
    return ServerActor.options(**opts).remote(settings, threads)


def start_actors(ctx: RunContext, num_actors: int) -> dict[str, Any]:
    """Start the client and server actors; return the first client's ``info()``.

    Raises ConfigError when a client cannot build its model (one line, from the actor).
    """
    assert ctx.strategy is not None, "the run's strategy is built before its actors"
    if ctx.placement is None:
        ctx.placement = Placement(num_actors)
    placement = ctx.placement
    key = pool_key(ctx.cfg, placement)
    num_labels = ctx.shards.num_labels
    if key is None:
        ctx.base = put_base(ctx.cfg, num_labels, placement.group)
    else:
        built_from = pickle.dumps((ctx.cfg.model.model_dump(mode="json"), ctx.cfg.seed, num_labels))
        ctx.base = actor_pool.shared_base(built_from,
                                          lambda: put_base(ctx.cfg, num_labels, None))
    warm = actor_pool.take(key)
    ctx.actors = (reset_warm(warm, ctx.cfg, num_labels, ctx.base) if warm else None) or [
        spawn_client(ctx.cfg, num_labels, placement, i, ctx.base) for i in range(num_actors)]
    ctx.server = spawn_server(ctx)
    infos = ray.get([a.info.remote() for a in ctx.actors])
    for info in infos:
        if info.get("error"):
            raise ConfigError(info["error"])
    for i, (actor, info) in enumerate(zip(ctx.actors, infos, strict=True)):
        _record_where(placement, i, actor, info)
    return infos[0]


def stop_actors(ctx: RunContext, keep_warm: bool = False) -> None:
    """Kill the run's actors (those already gone are skipped) and release their bundles. With
    ``keep_warm`` (a run that ended normally) the client actors go to this process's pool
    instead when reuse is on and they can be pooled (:mod:`fedbip_ray.runtime.actor_pool`)."""
    kill = getattr(ctx.server, "kill", None)  # a sharded server stops its own actors
    if callable(kill):
        kill()
    clients = [] if keep_warm and ctx.placement is not None and actor_pool.keep(
        pool_key(ctx.cfg, ctx.placement), ctx.actors) else ctx.actors
    for actor in [*clients, *([] if callable(kill) else [ctx.server])]:
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
    ctx.base = None  # frees the shared base once no actor holds it
    if ctx.placement is not None:
        release_bundles(ctx.placement.group)
        ctx.placement.group = None


def probe_actor(actor: Any, timeout: float) -> tuple[bool, dict[str, Any] | None]:
    """(alive, its ``info()``): alive is False only if the actor is dead for good (a
    restarting one is waited for); the info is None when it did not answer in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True, info
        except ray.exceptions.ActorDiedError:
            return False, None
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                return True, None
            time.sleep(0.5)
        except ray.exceptions.GetTimeoutError:
            return True, None  # busy (e.g. still on a cancelled straggler call)


def actor_alive(actor: Any, timeout: float) -> bool:
    """False only if the actor is dead for good (a restarting one is waited for)."""
    return probe_actor(actor, timeout)[0]


def heal_actors(ctx: RunContext, actor_indices: Sequence[int]) -> int:
    """Wait for the client actors ``actor_indices`` to be back (Ray restarts them, in their
    bundle, on a node the cluster still has or adds); replace those that are dead for good.
    Updates where each runs. Returns the number replaced."""
    replaced = 0
    if ctx.placement is None:
        ctx.placement = Placement(len(ctx.actors))
    for i in sorted(set(actor_indices)):
        if ctx.base is not None:  # a restarted actor shares the base again (else: a no-op)
            ctx.actors[i].use_base.remote(ctx.base)
        alive, info = probe_actor(ctx.actors[i], PING_TIMEOUT_S)
        if not alive:
            log.warning("client actor %d is dead (restarts exhausted): starting a new one", i)
            ctx.actors[i] = spawn_client(ctx.cfg, ctx.shards.num_labels, ctx.placement, i,
                                         ctx.base)
            replaced += 1
            info = probe_actor(ctx.actors[i], PING_TIMEOUT_S)[1]
        if info is not None and not info.get("error"):
            _record_where(ctx.placement, i, ctx.actors[i], info)
    return replaced
