"""Section 4, measured: ``aggregate_refs`` of N updates inside a real ``ServerActor``."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.perf.common import GIB, MIB, log
from benchmarks.perf.measure import TreeMemorySampler


def lora_layout(dim: int, n_params: int = 24) -> Any:
    """A LoRA-like layout of ``n_params`` flat parameters holding ``dim`` values in total."""
    from fedbip_ray.core.taskvector import Layout

    sizes = [dim // n_params + (1 if j < dim % n_params else 0) for j in range(n_params)]
    names = [f"base_model.model.layer.{j // 4}.attention.{'query' if j % 4 < 2 else 'value'}"
             f".lora_{'AB'[j % 2]}.default.weight" for j in range(n_params)]
    return Layout.from_shapes({name: (size,) for name, size in zip(names, sizes, strict=True)})


def make_update(client_id: int, round_num: int, dim: int, layout: Any) -> Any:
    """A client's update as a client actor returns it: (D,) float32 task vector (a shared
    direction plus noise, so cosines are positive)."""
    from fedbip_ray.runtime.messages import ClientUpdate

    rng = np.random.default_rng([client_id, round_num])
    vec = rng.standard_normal(dim, dtype=np.float32)
    vec *= np.float32(0.01)
    vec += np.float32(0.01)
    return ClientUpdate(client_id, round_num, vec, layout, 10 + client_id % 7,
                        {"train_loss": 0.5})


def _actor_pid(self: Any) -> int:
    """The actor's process id (run inside the actor by ``__ray_call__``, as the probes below)."""
    return os.getpid()


def _trace_start(self: Any) -> int:
    """Start tracemalloc; returns the bytes traced so far."""
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]


def _trace_stop(self: Any) -> int:
    """Stop tracemalloc; returns the peak of traced allocations (bytes)."""
    import tracemalloc

    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _held(self: Any) -> int:
    """Bytes of the numpy arrays the server object keeps (walks its attributes, and those of
    the objects it holds: its column blocks, its coordinator)."""
    seen: set[int] = set()

    def size(obj: Any, depth: int = 0) -> int:
        if id(obj) in seen or depth > 6:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            return int(obj.nbytes) if obj.base is None else size(obj.base, depth + 1)
        if isinstance(obj, dict):
            return sum(size(v, depth + 1) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(size(v, depth + 1) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type):  # the server's blocks
            return size(vars(obj), depth + 1)
        return 0

    return size(dict(vars(self)))


def _blas_threads(self: Any) -> str:
    """OMP_NUM_THREADS and the BLAS thread pools numpy uses inside the actor."""
    text = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p.get('internal_api')}:{p.get('num_threads')}" for p in threadpool_info()
                 if p.get("user_api") == "blas"]
        text += f", BLAS threads {', '.join(pools)}"
    except ImportError:
        pass
    return text


def _uss(self: Any) -> int:
    """The actor's private memory (USS, bytes) after a garbage collection."""
    import psutil

    gc.collect()
    return int(psutil.Process().memory_full_info().uss)


@dataclass
class AggRow:
    """One aggregation case (bytes; seconds)."""

    n: int
    d: int
    strategy: str
    seconds: float | None = None
    traced_peak: float | None = None  # tracemalloc peak of allocations made during the call
    actor_base: float | None = None  # actor USS right after it started (Python, numpy, Ray)
    held_before: float | None = None  # numpy arrays the server keeps between rounds
    actor_uss_before: float | None = None
    actor_uss_peak: float | None = None
    total_pss_peak: float | None = None
    store_bytes: float | None = None
    skipped: str | None = None
    accepted: int | None = None
    threads: str | None = None

    @property
    def matrix(self) -> float:
        """M = N x D x 4 bytes: one stacked matrix of task vectors."""
        return float(self.n) * self.d * 4

    @property
    def need(self) -> float | None:
        """Bytes this case needs at its peak beyond fixed baselines: the updates in the object
        store + the numpy arrays the server keeps between rounds (its states, the last round's
        task vectors, ...) + the call's allocations; scales with N x D."""
        if self.traced_peak is None or self.held_before is None:
            return None
        return self.matrix + self.held_before + self.traced_peak


def _ship_by_value() -> None:
    """Ray workers may not have ``benchmarks`` on their path: send this module's functions (the
    update maker and the actor probes) by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _start_ray(cases: Sequence[tuple[int, int]]) -> str:
    """A local Ray whose object store holds the largest case; returns its temp dir."""
    import psutil
    import ray

    from fedbip_ray.runtime.cluster import ray_env_defaults

    ray_env_defaults()
    total = psutil.virtual_memory().total
    biggest = max(n * d for n, d in cases) * 4
    store = int(min(biggest * 1.1 + 512 * MIB, 0.6 * total))
    tmp = tempfile.mkdtemp(prefix="rayperf", dir="/tmp")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             object_store_memory=store, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tmp, _node_ip_address="127.0.0.1")
    return tmp


def _run_case(row: AggRow, make: Any, ratio: float, force: bool) -> bool:
    """Measure one case unless it is predicted not to fit (then, or on failure, ``row.skipped``
    says why). Returns whether it was measured."""
    import psutil

    predicted = ratio * row.matrix + 2 * GIB  # store + actor + allocations + Ray, baselines
    vm = psutil.virtual_memory()
    avail = vm.available - 0.05 * vm.total  # Ray's memory monitor kills at 95% used
    if predicted > avail and not force:
        row.skipped = (f"skipped: predicted {predicted / GIB:.1f} GiB "
                       f"(~{ratio:.2f} x N*D*4 + 2 GiB) > available {avail / GIB:.1f} GiB")
        log(f"[aggregation] N={row.n}: {row.skipped}")
        return False
    log(f"[aggregation] N={row.n} D={row.d} {row.strategy} ...")
    try:
        measure_aggregation(row, make, lora_layout(row.d), row.strategy)
    except Exception as exc:  # noqa: BLE001 - e.g. killed by Ray's memory monitor
        row.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        log(f"[aggregation] N={row.n}: {row.skipped}")
        return False
    log(f"[aggregation] N={row.n} {row.strategy}: {row.seconds:.2f}s, "
        f"allocations {(row.traced_peak or 0) / GIB:.2f} GiB")
    return True


def aggregation_rows(cases: Sequence[tuple[int, int]], strategies: Sequence[str],
                     force: bool) -> list[AggRow]:
    """``aggregate_refs`` of N updates inside a real ServerActor for each (N, D) case (in
    ascending N x D), with the updates produced by Ray tasks into the object store as client
    actors do. Cases predicted not to fit into the available memory (from the last measured
    allocations / M) are skipped unless ``force``."""
    import ray

    _ship_by_value()
    tmp = None if ray.is_initialized() else _start_ray(cases)
    from fedbip_ray.runtime import actor_pool

    actor_pool.release()  # warm client actors of earlier runs would hold the tasks' CPUs
    make = ray.remote(num_cpus=1)(make_update)
    rows: list[AggRow] = []
    ratios = dict.fromkeys(strategies, 7.0)  # need / (N x D x 4), updated per measured case
    ordered = sorted(cases, key=lambda c: (c[0] * c[1], c[0]))
    try:
        for n, dim in ordered:
            for strategy in strategies:
                row = AggRow(n, dim, strategy)
                rows.append(row)
                if _run_case(row, make, ratios[strategy], force) and row.need:
                    ratios[strategy] = row.need / row.matrix  # predicts the next (larger) case
    finally:
        if tmp is not None:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def measure_aggregation(row: AggRow, make: Any, layout: Any, strategy: str) -> None:
    """Fill ``row``: one timed call, then one call under tracemalloc (fresh updates each)."""
    import ray

    from fedbip_ray.runtime.messages import ServerSettings
    from fedbip_ray.runtime.server import ServerActor

    n, dim = row.n, row.d
    # the validation gate (a client-side step, and one more N x D copy held until it runs)
    # is not part of the server's aggregation: measured without it
    params = {"gate": []} if strategy.startswith("fedbip") else {}
    server = ServerActor.options(num_cpus=0).remote(ServerSettings.of(strategy, params, n))
    try:
        row.actor_base = float(ray.get(server.__ray_call__.remote(_uss)))
        row.threads = ray.get(server.__ray_call__.remote(_blas_threads))
        ray.get(server.initialize.remote(np.zeros(dim, dtype=np.float32), layout))
        pid = ray.get(server.__ray_call__.remote(_actor_pid))
        for rnd, traced in ((1, False), (2, True)):
            refs = [make.remote(c, rnd, dim, layout) for c in range(n)]
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
            before = ray.get(server.__ray_call__.remote(_uss))
            held = ray.get(server.__ray_call__.remote(_held))
            if traced:
                ray.get(server.__ray_call__.remote(_trace_start))
            with (TreeMemorySampler(pid, 0.1, "uss") as actor_s,
                  TreeMemorySampler(os.getpid(), 0.25) as all_s):
                t0 = time.perf_counter()
                report = ray.get(server.aggregate_refs.remote(rnd, list(range(n)), refs))
                seconds = time.perf_counter() - t0
            if traced:
                row.traced_peak = float(ray.get(server.__ray_call__.remote(_trace_stop)))
                row.actor_uss_before, row.actor_uss_peak = float(before), float(actor_s.peak)
                row.held_before = float(held)
                row.total_pss_peak = float(all_s.peak)
            else:
                row.seconds = seconds
            row.accepted = len(report.accepted)
            row.store_bytes = float(n) * dim * 4
            del refs, report
            gc.collect()
    finally:
        ray.kill(server)
        gc.collect()


def allocation_ratios(rows: Sequence[AggRow], strategy: str
                      ) -> tuple[list[AggRow], list[float], bool]:
    """The measured cases of ``strategy``, their allocations per M, and whether those are
    constant across sizes (within 15%: memory linear in N x D)."""
    measured = [r for r in rows if r.traced_peak and r.strategy == strategy]
    ratios = [r.traced_peak / r.matrix for r in measured]  # type: ignore[operator]
    flat = bool(ratios) and max(ratios) <= 1.15 * min(ratios)
    return measured, ratios, flat
