"""How every process-level figure is measured: one memory sampler over a process tree, one way
to launch a measured child, one definition of a round's time."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.perf.common import ENTRY, MIB, REPO, RUN_TIMEOUT_S, child_env


class TreeMemorySampler:
    """Peak memory of a process and all its descendants, sampled by a background thread.

    Every ``interval`` seconds it sums ``metric`` (``"pss"``: proportional set size, so shared
    pages such as Ray's object store or shared libraries are counted once across processes;
    ``"uss"``: private memory only) over the root and its recursive children (psutil).
    Used as a context manager around the measured work.
    """

    def __init__(self, pid: int, interval: float = 0.25, metric: str = "pss") -> None:
        self.pid, self.interval, self.metric = pid, interval, metric
        self.peak = 0  # bytes
        self.peak_procs = 0
        self.peak_top: list[tuple[str, int]] = []  # (process, bytes) at the peak, largest first
        self.samples = 0
        self.first = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def sample(self) -> list[tuple[str, int]]:
        """(process, ``metric`` in bytes) of every process of the tree right now."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        out = []
        for p in procs:
            try:
                info = p.memory_full_info()
                name = process_name(p)
            except psutil.Error:
                continue
            out.append((name, int(getattr(info, self.metric, 0) or info.rss)))
        return out

    def _record(self) -> None:
        procs = self.sample()
        total = sum(b for _, b in procs)
        if self.samples == 0:
            self.first = total
        self.samples += 1
        if total > self.peak:
            self.peak, self.peak_procs = total, len(procs)
            self.peak_top = sorted(procs, key=lambda x: -x[1])

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def process_name(p: Any) -> str:
    """A short name: Ray's process title (``ray::ClientActor.fit``), else the script or binary."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(" ")[0]
    for arg in cmd[1:3]:
        if arg.endswith(".py") or arg in ("-m",):
            return Path(arg).name if arg.endswith(".py") else " ".join(cmd[1:3])
    return p.name()


def top_processes(top: Sequence[tuple[str, int]], limit: int = 6) -> str:
    """``name x count: MiB`` of the largest process kinds at the peak."""
    groups: dict[str, list[int]] = {}
    for name, size in top:
        key = name.split(".")[0] if name.startswith("ray::") else name
        groups.setdefault(key, []).append(size)
    parts = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:limit]
    return ", ".join(f"{k}{f' x{len(v)}' if len(v) > 1 else ''} {sum(v) / MIB:.0f}"
                     for k, v in parts)


def run_measured(cmd: Sequence[str], env: dict[str, str], log_path: Path,
                 timeout: float = RUN_TIMEOUT_S) -> tuple[int, float, TreeMemorySampler]:
    """Run ``cmd`` from the repository root with its output in ``log_path``; return
    (exit code, wall seconds from launch to exit, memory sampler of its process tree)."""
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        with TreeMemorySampler(proc.pid) as sampler:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        wall = time.perf_counter() - t0
    return rc, wall, sampler


def run_entry(flag: str, job: Path, log_path: Path) -> tuple[int, float, TreeMemorySampler]:
    """``benchmarks/performance.py FLAG JOB`` (a measured child of this benchmark) through
    :func:`run_measured`, in the children's environment."""
    return run_measured([sys.executable, str(ENTRY), flag, str(job)], child_env(), log_path)


def round_times(start: float, ends: Sequence[float]) -> list[float]:
    """Per-round seconds from the start instant and the end instant of every round."""
    out, prev = [], start
    for e in ends:
        out.append(e - prev)
        prev = e
    return out
