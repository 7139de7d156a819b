"""Sharded server benchmark: one aggregation of ``--participants`` updates over ``--clients``
stored states of ``--dim`` columns, for K = 1, 2, 4 server shards (federation.server_shards),
on a real local Ray: seconds per aggregation, peak memory per shard actor (its private
anonymous memory, ``RssAnon``: Ray's shared-memory object store, where the updates arrive, is
not counted) and in all,
bytes moved into the server, against the floor (one pass of the participants' Gram and one
of the update at this machine's measured matmul rate, and one pass over the states at its
measured memory bandwidth).

    python benchmarks/sharded_server.py                       # N=2000, D=1e6, 200 per round
    python benchmarks/sharded_server.py --clients 200 --dim 200000 --participants 50 --quick

Writes benchmarks/results/sharded_server.md (``_quick`` with --quick). The strategy is the
default ``fedbip`` without the validation gate (a client-side step); the layout is LoRA-like
(24 flat parameters in 12 modules), compared by plain dot products. The measured round's
participants took part in the warm-up round too: a steady round (a round with first-time
participants also runs their join aggregation over every informed client, a cost in N, not
measured here).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.perf.aggregation import lora_layout, make_update  # noqa: E402
from benchmarks.perf.common import GIB  # noqa: E402
from benchmarks.perf.machine import machine_line  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


@dataclass
class Row:
    shards: int
    seconds: float = float("nan")
    shard_peak: float = float("nan")  # largest peak USS of one block actor (bytes)
    idle: float = float("nan")  # RssAnon of an idle server actor (Python, numpy, Ray)
    threads: int = 1
    total_peak: float = float("nan")  # peak USS summed over the server's actors
    bytes_in: int = 0
    accepted: int = 0


def make_slices(client_id: int, round_num: int, dim: int, layout: Any, blocks: list) -> Any:
    """A client's update cut into one slice per block, as a client actor returns it."""
    from fedbip_ray.runtime.server import slice_update

    parts = slice_update(make_update(client_id, round_num, dim, layout), blocks)
    return tuple(parts) if len(parts) > 1 else parts[0]


def _pid(self: Any) -> int:
    return os.getpid()


def rss_anon(pid: int) -> int:
    """Private anonymous memory of a process (bytes; 0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Peak :func:`rss_anon` of each of ``pids``, sampled every ``interval`` s on a thread."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        import threading

        self.pids, self.interval = pids, interval
        self.peaks = [rss_anon(p) for p in pids]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peaks = [max(a, rss_anon(p)) for a, p in zip(self.peaks, self.pids, strict=True)]

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def floor_seconds(n_t: int, n: int, dim: int, cpus: int) -> tuple[float, float, float]:
    """(floor seconds, matmul GFLOP/s, memory GB/s) measured here: the Gram ``X Xᵀ`` and the
    update ``W X`` of an (n_t, D) float32 matrix at the rate of one (n_t, 2^18) product, and
    one read + write of the (N, D) states at the rate of a large copy."""
    width = 1 << 18
    x = np.random.default_rng(0).standard_normal((n_t, width), dtype=np.float32)
    w = np.random.default_rng(1).random((n_t, n_t), dtype=np.float32)
    t0 = time.perf_counter()
    _ = x @ x.T
    _ = w @ x
    mm = time.perf_counter() - t0
    flops = 2 * 2.0 * n_t * n_t * width
    rate = flops / mm
    big = np.ones(1 << 27, dtype=np.float32)  # 512 MiB
    copy = np.zeros_like(big)
    t0 = time.perf_counter()
    np.copyto(copy, big)
    bw = 2 * big.nbytes / (time.perf_counter() - t0)
    del copy, big
    compute = 2 * 2.0 * n_t * n_t * dim / rate
    memory = 2 * 4.0 * n_t * dim / bw  # the participants' states read and written once
    return compute + memory, rate / 1e9, bw / 1e9


def run_case(shards: int, n: int, dim: int, n_t: int, layout: Any, cpus: int) -> Row:
    """One measured aggregation (after one warm-up round) for ``shards`` blocks, each with
    ``max(1, cpus // shards)`` BLAS threads (the machine's ``cpus`` cores in all)."""
    import ray

    from fedbip_ray.core.blocks import split_layout
    from fedbip_ray.runtime.messages import ServerSettings
    from fedbip_ray.runtime.server import ServerActor
    from fedbip_ray.runtime.sharded import ShardedServer

    settings = ServerSettings.of("fedbip", {"gate": []}, n)
    blocks = split_layout(layout, shards)
    row = Row(shards, threads=max(1, cpus // shards))
    if shards == 1:
        server: Any = ServerActor.options(num_cpus=0).remote(settings, row.threads)
        actors = [server]
    else:
        server = ShardedServer(settings, shards, row.threads, {"num_cpus": 0}, {"num_cpus": 0})
    ray.get(server.initialize.remote(np.zeros(dim, dtype=np.float32), layout))
    if shards > 1:
        actors = server.blocks
    pids = [ray.get(a.__ray_call__.remote(_pid)) for a in actors]
    probe = ServerActor.options(num_cpus=0).remote(settings, 1)
    row.idle = float(rss_anon(ray.get(probe.__ray_call__.remote(_pid))))
    ray.kill(probe)
    make = ray.remote(num_cpus=1)(make_slices)
    try:
        for rnd in (1, 2):
            ids = list(range(n_t, 2 * n_t))  # the same clients: no first-time participant
            calls = [make.options(num_returns=shards).remote(c, rnd, dim, layout, blocks)
                     for c in ids]
            flat = [r for c in calls for r in (c if isinstance(c, list) else [c])]
            ray.wait(flat, num_returns=len(flat), fetch_local=False)
            with PeakSampler(pids) as sampler:
                t0 = time.perf_counter()
                report = ray.get(server.aggregate_refs.remote(rnd, ids, calls))
                seconds = time.perf_counter() - t0
            if rnd == 2:
                row.seconds = seconds
                row.shard_peak = float(max(sampler.peaks))
                row.total_peak = float(sum(sampler.peaks))
                row.bytes_in, row.accepted = report.bytes_in, len(report.accepted)
            del calls, flat, report
            gc.collect()
    finally:
        if shards == 1:
            ray.kill(server)
        else:
            server.kill()
    return row


def report(rows: list[Row], args: argparse.Namespace, floor: tuple[float, float, float],
           minutes: float) -> str:
    n, dim, n_t = args.clients, args.dim, args.participants
    matrix = n * dim * 4
    base = next(r for r in rows if r.shards == 1)
    lines = [
        f"# Sharded server{' (quick)' if args.quick else ''}: N = {n}, D = {dim:g}, "
        f"{n_t} participants per round", "",
        f"Command: `python benchmarks/sharded_server.py --clients {n} --dim {dim} "
        f"--participants {n_t}{' --quick' if args.quick else ''}`  ",
        f"{machine_line()}; {minutes:.1f} minutes; load average {args.load[0]:.1f} before, "
        f"{args.load[1]:.1f} after (other work on the machine). One local Ray node: the K shard "
        "actors share its cores, each with cores/K BLAS threads (at least 1; "
        "`resources.server_cpus`).", "",
        f"Floor: {floor[0]:.2f} s (the participants' Gram and update at {floor[1]:.1f} GFLOP/s "
        f"measured here, plus their states at {floor[2]:.1f} GB/s). N·D·4 = "
        f"{matrix / GIB:.2f} GiB; an idle server actor's RssAnon (Python, numpy, Ray) is "
        f"{rows[0].idle / GIB:.2f} GiB.", "",
        "| shards K | BLAS threads each | seconds | x floor | x K=1 | peak per shard (RssAnon) | "
        "(peak − idle actor) / (N·D·4/K) | total peak | bytes into the server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shards} | {r.threads} | {r.seconds:.2f} | {r.seconds / floor[0]:.2f} | "
            f"{r.seconds / base.seconds:.2f} | {r.shard_peak / GIB:.2f} GiB | "
            f"{(r.shard_peak - r.idle) / (matrix / r.shards):.2f} | {r.total_peak / GIB:.2f} GiB | "
            f"{r.bytes_in / GIB:.2f} GiB |")
    lines += ["", "Goals: memory per shard <= 1.3 x N·D·4/K; time <= 2 x floor at K = 1 and no "
              "worse than K = 1 at K > 1 on this machine."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--participants", type=int, default=200)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="results file name *_quick.md")
    args = ap.parse_args(argv)
    import ray
    from ray import cloudpickle

    from fedbip_ray.runtime.cluster import ray_env_defaults

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    import benchmarks.perf.aggregation as agg

    cloudpickle.register_pickle_by_value(agg)
    t0 = time.perf_counter()
    cpus = os.cpu_count() or 2
    load0 = os.getloadavg()[0]
    floor = floor_seconds(args.participants, args.clients, args.dim, cpus)
    ray_env_defaults()
    tmp = tempfile.mkdtemp(prefix="rayshard", dir="/tmp")
    store = int(2.5 * args.participants * args.dim * 4 + (1 << 30))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=store,
             logging_level="ERROR", log_to_driver=False, _temp_dir=tmp,
             _node_ip_address="127.0.0.1")
    layout = lora_layout(args.dim)
    try:
        rows = [run_case(int(k), args.clients, args.dim, args.participants, layout, cpus)
                for k in args.shards.split(",")]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    args.load = (load0, os.getloadavg()[0])
    text = report(rows, args, floor, (time.perf_counter() - t0) / 60)
    print(text)
    name = "sharded_server_quick.md" if args.quick else "sharded_server.md"
    (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
