"""A fake multi-node Ray cluster on this machine (``cluster.local.yaml``), started and stopped by
pid.

``start(DIR)`` runs ``ray start --head`` with Ray's fake multi-node autoscaler under the Ray temp
dir ``DIR`` on free loopback ports and writes ``DIR/fedbip-cluster.json`` (addresses, ports, the
pids it started). Worker "nodes" the autoscaler adds later are raylets holding files under the
same ``DIR``. ``stop(DIR)`` ends exactly the processes that hold ``DIR`` (by ``/proc/PID/cmdline``
and ``/proc/PID/fd``) plus the recorded pids; it never runs ``ray stop``.

Command line (also ``scripts/local_cluster.sh``)::

    python -m fedbip_ray.runtime.local_cluster start|stop|status DIR [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "cluster.local.yaml"
STATE_FILE = "fedbip-cluster.json"
PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")


@dataclass(frozen=True)
class LocalCluster:
    """What ``start`` started: ``gcs_address`` for ``ray.init``/``RAY_ADDRESS``, ``dashboard_url``
    for ``ray job submit --address``; ``pids`` maps pid -> process create time."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    config_path: str
    ports: dict[str, int]
    pids: dict[int, float] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Ray processes of this cluster (fake provider on, loopback only)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra or {})
    return env


def write_autoscaling_config(source: Path, gcs_address: str, dest: Path) -> dict[str, Any]:
    """``source`` with ``provider.gcs_address`` filled in, written to ``dest``; returns it."""
    cfg = yaml.safe_load(source.read_text())
    if cfg.get("provider", {}).get("type") != "fake_multinode":
        raise ValueError(f"{source}: provider.type must be fake_multinode")
    cfg["provider"]["gcs_address"] = gcs_address
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def head_command(temp_dir: Path, config_path: Path, head_resources: dict[str, float],
                 ports: dict[str, int]) -> list[str]:
    """``ray start --head`` for this cluster, every port explicit."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head",
           "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
           f"--dashboard-port={ports['dashboard']}", "--dashboard-host=127.0.0.1",
           f"--num-cpus={head_resources.get('CPU', 1):g}",
           f"--num-gpus={head_resources.get('GPU', 0):g}",
           f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}", "--disable-usage-stats"]
    return cmd + [f"--{flag}={ports[flag]}" for flag in PORT_FLAGS]


def start(temp_dir: str | Path, config: str | Path = DEFAULT_CONFIG, timeout_s: float = 120.0,
          env: dict[str, str] | None = None) -> LocalCluster:
    """Start the head (no workers yet) under ``temp_dir``; RuntimeError if it does not come up.

    ``temp_dir`` should be short (Ray's socket paths live under it) and hold no other cluster.
    ``env``: extra environment of the head's processes (e.g. ``RAY_health_check_period_ms``);
    the nodes the autoscaler adds inherit it.
    """
    tmp = Path(temp_dir).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    if (tmp / STATE_FILE).exists() and cluster_pids(tmp):
        raise RuntimeError(f"{tmp}: a local cluster is already running there")
    ports = {"gcs": free_port(), "dashboard": free_port(), **{f: free_port() for f in PORT_FLAGS}}
    gcs = f"127.0.0.1:{ports['gcs']}"
    cfg_path = tmp / "autoscaling.yaml"
    cfg = write_autoscaling_config(Path(config), gcs, cfg_path)
    head_res = cfg["available_node_types"][cfg["head_node_type"]].get("resources", {})
    try:
        proc = subprocess.run(head_command(tmp, cfg_path, head_res, ports), env=ray_env(env),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(tmp)
        raise RuntimeError(f"ray start did not return in {timeout_s:g} s") from None
    cluster = LocalCluster(str(tmp), gcs, f"http://127.0.0.1:{ports['dashboard']}",
                           str(cfg_path), ports)
    if proc.returncode != 0:
        stop(tmp)
        raise RuntimeError(f"ray start failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    try:
        wait_http(f"{cluster.dashboard_url}/api/version", timeout_s)
    except TimeoutError:
        stop(tmp)
        raise RuntimeError(f"the dashboard at {cluster.dashboard_url} did not answer in "
                           f"{timeout_s:g} s") from None
    cluster = LocalCluster(**{**asdict(cluster), "pids": _with_create_times(cluster_pids(tmp))})
    (tmp / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2))
    return cluster


def wait_http(url: str, timeout_s: float) -> None:
    """Until ``url`` answers 200; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def load(temp_dir: str | Path) -> LocalCluster:
    """The state ``start`` wrote under ``temp_dir`` (FileNotFoundError if none)."""
    data = json.loads((Path(temp_dir).resolve() / STATE_FILE).read_text())
    data["pids"] = {int(k): float(v) for k, v in data.get("pids", {}).items()}
    return LocalCluster(**data)


def _own_lineage() -> set[int]:
    """This process and its ancestors (never stopped, even when they hold the temp dir)."""
    pids, proc = set(), psutil.Process()
    while proc is not None:
        pids.add(proc.pid)
        proc = proc.parent()
    return pids


def _holds(proc: psutil.Process, tmp: Path) -> bool:
    """Whether ``proc``'s command line or one of its open files names ``tmp`` or a path under it."""
    root, prefix = str(tmp), f"{tmp}{os.sep}"
    try:
        if any(prefix in part or part.endswith(root) for part in proc.cmdline()):
            return True
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                if target == root or target.startswith(prefix):
                    return True
            except OSError:
                continue
    except (psutil.Error, OSError):
        return False
    return False


def cluster_pids(temp_dir: str | Path) -> list[int]:
    """Pids (this user's) holding ``temp_dir``, their descendants, and still-alive pids recorded
    at start; never this process or its ancestors."""
    tmp = Path(temp_dir).resolve()
    skip, uid = _own_lineage(), os.getuid()
    found = set()
    for proc in psutil.process_iter(["uids"]):
        if proc.pid in skip or not proc.info["uids"] or proc.info["uids"].real != uid:
            continue
        if _holds(proc, tmp):
            found.add(proc.pid)
    if (tmp / STATE_FILE).exists():
        found |= {pid for pid, created in load(tmp).pids.items() if _alive_since(pid, created)}
    return sorted((found | _descendants(found)) - skip)


def _descendants(pids: set[int]) -> set[int]:
    """Every descendant of ``pids`` (e.g. the dashboard's forkserver, which holds no file there)."""
    out: set[int] = set()
    for pid in pids:
        try:
            out |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            continue
    return out


def _alive_since(pid: int, created: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - created) < 1e-3
    except psutil.Error:
        return False


def _with_create_times(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            continue
    return out


def _signal(pids: list[int], kill: bool) -> list[psutil.Process]:
    """SIGKILL (or SIGTERM) each pid still alive; the processes signalled."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.kill() if kill else proc.terminate()
            procs.append(proc)
        except psutil.Error:
            continue
    return procs


def _terminate(pids: list[int], grace_s: float) -> None:
    procs = _signal(pids, kill=False)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)


def stop(temp_dir: str | Path, grace_s: float = 3.0) -> list[int]:
    """Stop every process of the cluster under ``temp_dir`` (by pid); return the pids stopped.

    The autoscaler goes first so that it launches no node while the rest stops; the rest get
    SIGTERM, and SIGKILL after ``grace_s``. Raises RuntimeError if any is still alive at the end.
    """
    stopped: set[int] = set()
    for _ in range(3):
        pids = cluster_pids(temp_dir)
        if not pids:
            break
        monitors = [p for p in pids if _is_monitor(p)]
        _terminate(monitors, 0.0)  # the autoscaler ignores SIGTERM: killed at once
        _terminate([p for p in pids if p not in monitors], grace_s)
        stopped |= set(pids)
    left = cluster_pids(temp_dir)
    if left:
        raise RuntimeError(f"processes of the cluster under {temp_dir} still alive: {left}")
    return sorted(stopped)


def node_pids(temp_dir: str | Path, node_id: str) -> list[int]:
    """Pids of one node of the cluster under ``temp_dir``: this user's processes whose command
    line names ``node_id`` (the raylet's ``--node_id=``, the agents' ``--node-id=``) and a path
    under ``temp_dir``, and their descendants (the node's workers)."""
    flags = {f"--node_id={node_id}", f"--node-id={node_id}"}
    prefix, uid = f"{Path(temp_dir).resolve()}{os.sep}", os.getuid()
    found = set()
    for proc in psutil.process_iter(["cmdline", "uids"]):
        cmd, uids = proc.info["cmdline"] or [], proc.info["uids"]
        if uids and uids.real == uid and flags & set(cmd) and any(prefix in c for c in cmd):
            found.add(proc.pid)
    return sorted((found | _descendants(found)) - _own_lineage())


def kill_node(temp_dir: str | Path, node_id: str) -> list[int]:
    """SIGKILL every process of one node at once (as when its machine is lost); returns the
    pids. RuntimeError if the node has no process under ``temp_dir``."""
    pids = node_pids(temp_dir, node_id)
    if not pids:
        raise RuntimeError(f"no process of node {node_id} under {temp_dir}")
    psutil.wait_procs(_signal(pids, kill=True), timeout=10)
    return pids


def nodes(cluster: LocalCluster, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The cluster's nodes as its dashboard lists them (``node_id``, ``state``,
    ``is_head_node``, ``resources_total``, ...), dead ones included."""
    url = f"{cluster.dashboard_url}/api/v0/nodes?limit=1000&detail=true"
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        body = json.loads(r.read())
    return list(body["data"]["result"]["result"])


def _is_monitor(pid: int) -> bool:
    try:
        return any(part.endswith("monitor.py") for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def status(temp_dir: str | Path) -> dict[str, Any]:
    """The recorded state plus the pids alive now (``running`` is whether any is)."""
    tmp = Path(temp_dir).resolve()
    state = asdict(load(tmp)) if (tmp / STATE_FILE).exists() else {"temp_dir": str(tmp)}
    pids = cluster_pids(tmp)
    return {**state, "alive_pids": pids, "running": bool(pids)}


def main(argv: list[str] | None = None) -> int:
    """``start|stop|status DIR``: prints JSON; exit 0 on success, 1 on failure."""
    parser = argparse.ArgumentParser(prog="local_cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("temp_dir")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            result: Any = asdict(start(args.temp_dir, args.config))
        elif args.action == "stop":
            result = {"stopped": stop(args.temp_dir)}
        else:
            result = status(args.temp_dir)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"local_cluster: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
