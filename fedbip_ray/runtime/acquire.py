"""Autoscaling-aware acquisition of the client actors' resources (one placement group).

How the run loop uses it (Ray already connected)::

    bundle = bundle_shape(rc.num_cpus_per_client, rc.num_gpus_per_client)
    limits = cluster_limits(bundle)                            # autoscaler? what could it add?
    n = plan_num_actors(num_clients, bundle, limits, requested=rc.num_actors,
                        max_actors=rc.max_actors)              # ConfigError if never possible
    pg = acquire_bundles(n, rc.num_cpus_per_client, rc.num_gpus_per_client,
                         timeout_s=rc.acquire_timeout_s, echo=echo,
                         limits=limits)                        # ConfigError on timeout
    actors = [ClientActor.options(num_cpus=..., num_gpus=..., **actor_options(pg, i)).remote(...)
              for i in range(n)]
    ...
    release_bundles(pg)                                        # after the actors are killed

Creating the placement group is the resource request the autoscaler scales up for, so a cluster
whose GPU node type has ``min_workers: 0`` starts with no GPU node and gets them here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import yaml
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fedbip_ray.config import ConfigError

Bundle = dict[str, float]
STATUS_KEY = "__autoscaling_status"
EPS = 1e-9


@dataclass(frozen=True)
class NodeType:
    """One node type an autoscaler can run: its resources and at most how many (-1: no limit).

    The head type counts once and outside the ``max_workers`` cap.
    """

    name: str
    resources: Bundle
    max_count: int
    head: bool = False


@dataclass(frozen=True)
class ClusterLimits:
    """What the cluster could ever provide.

    ``autoscaler``: an autoscaler can add nodes. ``node_types``: its node types when its config
    is readable, else None (then only a timeout can tell). ``max_workers``: the cap on worker
    nodes of all types (None: none). ``nodes``: total resources of each alive node now.
    ``source``: where the limits came from (for messages).
    """

    autoscaler: bool
    node_types: tuple[NodeType, ...] | None
    max_workers: int | None
    nodes: tuple[Bundle, ...]
    source: str


def bundle_shape(cpus_per_actor: float, gpus_per_actor: float) -> Bundle:
    """The bundle one client actor needs (zero entries left out; empty when it needs nothing)."""
    return {k: float(v) for k, v in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)) if v > 0}


def format_bundle(bundle: Mapping[str, float]) -> str:
    """``{CPU: 1, GPU: 0.5}``."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def fits_per_node(bundle: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many ``bundle``s one node with ``resources`` holds (0 for an empty bundle)."""
    fit = math.inf
    for key, need in bundle.items():
        if need > 0:
            fit = min(fit, math.floor(float(resources.get(key, 0)) / need + EPS))
    return 0 if fit == math.inf else int(fit)


def present_capacity(bundle: Bundle, nodes: tuple[Bundle, ...]) -> int:
    """Bundles the alive nodes hold (by total resources; a bundle never spans two nodes)."""
    return sum(fits_per_node(bundle, res) for res in nodes)


def configured_capacity(bundle: Bundle, node_types: tuple[NodeType, ...],
                        max_workers: int | None) -> int | None:
    """Bundles the node types could hold at their largest; None when that has no bound."""
    budget: float = math.inf if max_workers is None else max_workers
    total = 0
    workers = sorted((t for t in node_types if not t.head),
                     key=lambda t: -fits_per_node(bundle, t.resources))
    for t in workers:
        fit = fits_per_node(bundle, t.resources)
        count = budget if t.max_count < 0 else min(t.max_count, budget)
        if fit == 0 or count <= 0:
            continue
        if count == math.inf:
            return None
        total += fit * int(count)
        budget -= count
    return total + sum(fits_per_node(bundle, t.resources) for t in node_types if t.head)


def ceiling_capacity(bundle: Bundle, limits: ClusterLimits) -> int | None:
    """Bundles the cluster could ever hold; None when an autoscaler's limits are unknown or
    unbounded."""
    present = present_capacity(bundle, limits.nodes)
    if not limits.autoscaler:
        return present
    if limits.node_types is None:
        return None
    most = configured_capacity(bundle, limits.node_types, limits.max_workers)
    return None if most is None else max(present, most)


# ------------------------------------------------------------------ what the autoscaler could add
def launcher_node_types(cfg: Mapping[str, Any]) -> tuple[tuple[NodeType, ...] | None, int | None]:
    """Node types and the worker cap of a cluster-launcher config (``cluster.yaml``'s format).

    The node types are None when one of them declares no ``resources`` (the cloud fills them
    in; without them nothing can be promised).
    """
    types, head = cfg.get("available_node_types") or {}, cfg.get("head_node_type")
    out = []
    for name, spec in types.items():
        if not isinstance(spec, Mapping) or "resources" not in spec:
            return None, None
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        is_head = name == head
        count = 1 if is_head else int(spec.get("max_workers", cfg.get("max_workers", 0)))
        out.append(NodeType(str(name), res, count, is_head))
    cap = cfg.get("max_workers")
    return tuple(out), None if cap is None else int(cap)


def gcs_node_types() -> tuple[NodeType, ...] | None:
    """Node groups the autoscaler reported to the GCS (KubeRay, autoscaler v2); None if none."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key
        return None
    if config is None or not config.node_group_configs:
        return None
    return tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
                 for g in config.node_group_configs)


def autoscaler_status() -> dict[str, Any] | None:
    """The monitor's last status report from the GCS (None when no monitor runs)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(STATUS_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def status_node_types(status: Mapping[str, Any]) -> set[str]:
    """Node type names a monitor status report mentions."""
    report = status.get("autoscaler_report") or {}
    names = set((report.get("active_nodes") or {}).keys())
    names |= set((report.get("idle_nodes") or {}).keys())
    names |= set((report.get("pending_launches") or {}).keys())
    names |= set((report.get("node_type_mapping") or {}).values())
    return names


def is_readonly(status: Mapping[str, Any]) -> bool:
    """Whether the monitor only mirrors the nodes (no autoscaling config: types ``node_<id>``)."""
    names = status_node_types(status)
    return not names or all(n.startswith("node_") for n in names)


def monitor_config_path(status: Mapping[str, Any], gcs_address: str) -> Path | None:
    """The ``--autoscaling-config`` file of this cluster's monitor, if it runs on this machine."""
    pid, port = status.get("monitor_pid"), gcs_address.rsplit(":", 1)[-1]
    if not isinstance(pid, int):
        return None
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    if not any(p.endswith("monitor.py") for p in cmd) or not any(
            p.startswith("--gcs-address=") and p.rsplit(":", 1)[-1] == port for p in cmd):
        return None
    for part in cmd:
        if part.startswith("--autoscaling-config="):
            path = Path(part.split("=", 1)[1]).expanduser()
            return path if path.is_file() else None
    return None


def _await_status(wait_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        status = autoscaler_status()
        if status is not None:
            return status
    return None


def alive_nodes() -> tuple[Bundle, ...]:
    """Total resources of every alive node."""
    return tuple({k: float(v) for k, v in n.get("Resources", {}).items()}
                 for n in ray.nodes() if n.get("Alive"))


def cluster_limits(bundle: Bundle | None = None, status_wait_s: float = 15.0) -> ClusterLimits:
    """Whether an autoscaler runs and what it could provide (Ray must be connected).

    Sources, first found wins: node groups in the GCS; the monitor's ``--autoscaling-config``
    file (readable when the driver runs on the head, as under ``ray job submit``). A monitor that
    only mirrors the nodes (plain ``ray start``, ``ray.init()``) is no autoscaler. When the
    nodes present cannot hold one ``bundle`` and the monitor has not reported yet (a cluster
    just started), its first report is awaited for up to ``status_wait_s``.
    """
    nodes = alive_nodes()
    types = gcs_node_types()
    if types is not None:
        return ClusterLimits(True, types, None, nodes, "the autoscaler's node groups")
    status = autoscaler_status()
    if status is None and bundle and present_capacity(bundle, nodes) == 0:
        status = _await_status(status_wait_s)
    if status is None or is_readonly(status):
        return ClusterLimits(False, None, None, nodes, "the nodes present")
    path = monitor_config_path(status, ray.get_runtime_context().gcs_address)
    if path is None:
        return ClusterLimits(True, None, None, nodes, "an autoscaler of unknown limits")
    try:
        types, cap = launcher_node_types(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, TypeError, ValueError):
        types, cap = None, None
    return ClusterLimits(True, types, cap, nodes, f"the autoscaler's config ({path})")


# ------------------------------------------------------------------------ how many, and why not
FIELDS = {"CPU": "resources.num_cpus_per_client", "GPU": "resources.num_gpus_per_client"}


def describe_limits(limits: ClusterLimits) -> str:
    """``gpu_worker {CPU: 1, GPU: 1} x3, ...`` or the present nodes' totals."""
    if limits.autoscaler and limits.node_types is not None:
        kinds = ", ".join(f"{t.name} {format_bundle(t.resources)} "
                          f"x{t.max_count if t.max_count >= 0 else 'any'}"
                          for t in limits.node_types)
        cap = "" if limits.max_workers is None else f", at most {limits.max_workers} workers"
        return f"{limits.source}: {kinds}{cap}"
    totals: dict[str, float] = {}
    for node in limits.nodes:
        for key in ("CPU", "GPU"):
            totals[key] = totals.get(key, 0.0) + node.get(key, 0.0)
    scaler = "an autoscaler of unknown limits" if limits.autoscaler else "no autoscaler"
    count = f"{len(limits.nodes)} node{'' if len(limits.nodes) == 1 else 's'}"
    return f"{count} with {format_bundle(totals)}, {scaler}"


def never_message(bundle: Bundle, limits: ClusterLimits) -> str:
    """One line: which per-client resource no node can ever hold."""
    per_node = [t.resources for t in limits.node_types or ()] + list(limits.nodes)
    short = [k for k, v in bundle.items()
             if all(r.get(k, 0.0) + EPS < v for r in per_node)] or list(bundle)
    key = short[0]
    field = FIELDS.get(key, f"resources {key}")
    hint = " (set it to 0 to train on CPU)" if key == "GPU" else ""
    return (f"{field}={bundle[key]:g}: no node can ever hold a client's bundle "
            f"{format_bundle(bundle)} "
            f"({describe_limits(limits)}){hint}")


def plan_num_actors(num_clients: int, bundle: Bundle, limits: ClusterLimits,
                    requested: int | None = None, max_actors: int | None = None) -> int:
    """Client actors to ask for: ``requested`` (at most ``num_clients``) if set, else
    min(num_clients, max_actors, ceiling).

    The ceiling is what the cluster could ever hold (``ceiling_capacity``); with an autoscaler
    of unknown limits there is none and the acquisition's timeout decides. Raises ConfigError
    (one line) when not one actor, or not ``requested`` actors, could ever be placed.
    """
    ceiling = ceiling_capacity(bundle, limits) if bundle else None
    if ceiling == 0:
        raise ConfigError(never_message(bundle, limits))
    if requested is not None:
        requested = max(1, min(requested, num_clients))
        if ceiling is not None and requested > ceiling:
            raise ConfigError(f"resources.num_actors={requested}: the cluster can hold at most "
                              f"{ceiling} "
                              f"bundles {format_bundle(bundle)} ({describe_limits(limits)})")
        return requested
    n = num_clients
    for cap in (max_actors, ceiling):
        if cap is not None:
            n = min(n, cap)
    return max(1, n)


# ------------------------------------------------------------------------------------ acquisition
def acquire_bundles(num_actors: int, cpus_per_actor: float, gpus_per_actor: float,
                    timeout_s: float = 600.0, echo: Callable[[str], None] = print,
                    progress_s: float = 5.0,
                    limits: ClusterLimits | None = None) -> PlacementGroup | None:
    """Reserve ``num_actors`` bundles {CPU, GPU} in one SPREAD placement group and wait for it.

    Creating the group is the autoscaler's scale-up request. Prints a progress line every
    ``progress_s`` seconds. Returns the ready group (None when an actor needs no resources).
    Raises ConfigError (one line) at once when the cluster could never hold the bundles, or
    after ``timeout_s`` (the group is removed first).
    """
    bundle = bundle_shape(cpus_per_actor, gpus_per_actor)
    if not bundle:
        return None
    limits = limits if limits is not None else cluster_limits(bundle)
    ceiling = ceiling_capacity(bundle, limits)
    if ceiling == 0:
        raise ConfigError(never_message(bundle, limits))
    if ceiling is not None and ceiling < num_actors:
        raise ConfigError(f"the cluster can hold at most {ceiling} of {num_actors} bundles "
                          f"{format_bundle(bundle)} ({describe_limits(limits)})")
    pg = placement_group([dict(bundle) for _ in range(num_actors)], strategy="SPREAD")
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        if pg.wait(max(0.1, min(progress_s, timeout_s - waited))):
            echo(f"client resources ready: {num_actors} bundles {format_bundle(bundle)} on "
                 f"{len(set(bundle_nodes(pg)))} nodes, {time.monotonic() - start:.0f} s")
            return pg
        waited = time.monotonic() - start
        if waited >= timeout_s:
            remove_placement_group(pg)
            raise ConfigError(timeout_message(bundle, num_actors, waited, limits))
        echo(progress_line(bundle, num_actors, waited))


def _fit_now(bundle: Bundle, num_actors: int) -> int:
    return min(num_actors, present_capacity(bundle, alive_nodes()))


def progress_line(bundle: Bundle, num_actors: int, waited: float) -> str:
    """``waiting for client resources: 1 of 4 bundles {CPU: 1, GPU: 1} ready, 12 s (...)``."""
    status = autoscaler_status() or {}
    launching = (status.get("autoscaler_report") or {}).get("pending_launches") or {}
    extra = ", ".join(f"{n} {kind}" for kind, n in launching.items())
    tail = f" (autoscaler launching {extra})" if extra else ""
    return (f"waiting for client resources: {_fit_now(bundle, num_actors)} of {num_actors} bundles "
            f"{format_bundle(bundle)} ready, {waited:.0f} s{tail}")


def timeout_message(bundle: Bundle, num_actors: int, waited: float, limits: ClusterLimits) -> str:
    """One line: what the cluster gave, in how long, and what never came."""
    got = _fit_now(bundle, num_actors)
    report = (autoscaler_status() or {}).get("autoscaler_report") or {}
    failed = report.get("failed_nodes") or []
    if limits.autoscaler:
        why = "the autoscaler did not add the nodes in time"
        why += f" ({len(failed)} node launches failed)" if failed else ""
    else:
        why = "no autoscaler can add nodes"
    return (f"the cluster gave {got} of {num_actors} bundles {format_bundle(bundle)} in "
            f"{waited:.0f} s; "
            f"{why} ({describe_limits(limits)}); lower resources.num_actors or raise "
            f"resources.acquire_timeout_s")


def bundle_nodes(pg: PlacementGroup) -> list[str]:
    """Node id (hex) of each bundle of a ready group."""
    table = ray.util.placement_group_table(pg)
    placed = table.get("bundles_to_node_id") or {}
    return [placed[i] for i in sorted(placed)]


def actor_options(pg: PlacementGroup | None, index: int) -> dict[str, Any]:
    """``.options(**actor_options(pg, i))`` puts actor ``i`` in bundle ``i`` ({} without a group).

    The actor must ask for the bundle's resources (num_cpus, num_gpus) itself.
    """
    if pg is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=index,
        placement_group_capture_child_tasks=False)}


def release_bundles(pg: PlacementGroup | None) -> None:
    """Remove the group (after its actors are gone); no-op for None or a removed group."""
    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - already removed, or Ray shut down
        pass
