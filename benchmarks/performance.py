"""Performance and scale benchmark of fedbip-ray.

Sections (``--sections``, default: all):

* ``overhead``: round wall time of a fedbip-ray FedAvg run against the compute floor of the
  same work: the same local training and evaluation (``make_trainer``, i.e. ``LocalTrainer``
  for sequence classification, on the same Parquet shards) in plain worker processes
  (multiprocessing, the same parallelism and torch threads, the model loaded once per worker,
  no framework). Models ``tiny-bert`` and ``minilm``.
* ``flower``: the same work under Flower 1.42's simulation engine (``run_simulation``,
  ServerApp + ClientApp, FedAvg, client ``num_cpus=1``), run from its own venv
  (``benchmarks/flower_baseline/``), side by side with fedbip-ray: per-round times, whole-run
  wall time including start-up, peak memory of all processes. Models ``minilm`` and
  ``smollm2`` (SmolLM2-135M-Instruct, ``model.task: causal-lm``, instruction tasks).
* ``pool``: a fixed number of client actors serve N = 8 ... 512 clients (tiny-bert, a fixed
  number of clients per round): round time and peak memory against N.
* ``aggregation``: ``FederatedServer.aggregate`` inside a real ``ServerActor`` at N x D up to
  1000 x 1e6: time, allocations made by the call (tracemalloc inside the actor), private memory
  of the actor and memory of all processes (the task vectors sit in Ray's object store).
* ``bytes``: bytes per round from ``metrics.jsonl`` (``bytes_in``/``bytes_out``) of the fedbip
  runs above against the minimum 2 x participating clients x D x 4.

Every process-level figure comes from one sampler (:class:`TreeMemorySampler`: PSS summed over
the process tree, sampled by a psutil thread) and one clock definition (a round ends when its
evaluation ends; a round's time is the time since the previous round ended, the first round
counting from when the clients were ready).

Usage::

    python benchmarks/performance.py [--quick] [--sections overhead,flower,pool,aggregation,bytes]
        [--out benchmarks/results/performance.md]
    fedbip bench performance [ARGS]

``--quick`` runs tiny sizes (CI smoke run; no file is written unless ``--out`` is given).
``main(argv)`` is what ``fedbip bench performance`` calls.
"""

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
FLOWER_DIR = REPO / "benchmarks" / "flower_baseline"
DEFAULT_OUT = Path("benchmarks/results/performance.md")
DEFAULT_FLOWER_PYTHON = os.environ.get("FEDBIP_FLOWER_PYTHON", "/work/flower-venv/bin/python")
SECTIONS = ("overhead", "flower", "pool", "aggregation", "bytes")
GIB = 1024**3
MIB = 1024**2
RUN_TIMEOUT_S = 3 * 3600

# Environment of every measured process: quiet, offline, loopback-only Ray, no telemetry.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


# ---------------------------------------------------------------------------------- presets
def _base(name: str, model: dict[str, Any], data: dict[str, Any], train: dict[str, Any],
          rounds: int, **federation: Any) -> dict[str, Any]:
    """A FedAvg config (dict form of ``fedbip_ray.config.Config``), MLflow off."""
    return {
        "name": name,
        "seed": 0,
        "model": model,
        "data": data,
        "train": train,
        "strategy": {"name": "fedavg"},
        "federation": {"rounds": rounds, "eval_every": 1, **federation},
        "resources": {"num_cpus_per_client": 1},
        "tracking": {"mlflow": False},
    }


def model_config(model: str, quick: bool) -> dict[str, Any]:
    """The federation used for ``model`` in the overhead and Flower sections (8 clients, FedAvg,
    full participation, evaluation of every client on its val and test split every round)."""
    if model == "tiny-bert":
        return _base(
            "perf-tiny-bert",
            {"name": "tiny-bert", "max_length": 24, "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
            {"dataset": "synthetic-text", "num_clients": 8, "examples_per_client": 24 if quick else 60,
             "partition": {"kind": "iid"}},
            {"local_epochs": 1 if quick else 3, "batch_size": 16, "lr": 0.02},
            rounds=2 if quick else 6,
        )
    if model == "minilm":
        return _base(
            "perf-minilm",
            {"name": "minilm", "max_length": 48, "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
            {"dataset": "rotten-tomatoes", "num_clients": 8, "examples_per_client": 40 if quick else 150,
             "partition": {"kind": "iid"}},
            {"local_epochs": 1, "batch_size": 16, "lr": 0.002},
            rounds=2 if quick else 5,
        )
    if model == "smollm2":
        return _base(
            "perf-smollm2",
            {"name": "smollm2", "task": "causal-lm", "max_length": 64,
             "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
            {"dataset": "instruct-tasks", "num_clients": 8, "examples_per_client": 12 if quick else 32,
             "partition": {"kind": "column"}},
            {"local_epochs": 1, "batch_size": 8, "lr": 0.001, "eval_batch_size": 16},
            rounds=2 if quick else 3,
        )
    if model == "tiny-llama":
        return _base(
            "perf-tiny-llama",
            {"name": "tiny-llama", "task": "causal-lm", "max_length": 80,
             "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
             "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
            {"dataset": "instruct-tasks", "num_clients": 8, "examples_per_client": 12,
             "partition": {"kind": "column"}},
            {"local_epochs": 1, "batch_size": 8, "lr": 0.01, "eval_batch_size": 8},
            rounds=2,
        )
    raise ValueError(f"unknown benchmark model {model!r} (tiny-bert, minilm, smollm2, tiny-llama)")


def pool_config(num_clients: int, per_round: int, rounds: int, max_actors: int) -> dict[str, Any]:
    """Pool mode: ``max_actors`` actors hold tiny-bert once each and serve ``num_clients``
    clients with 7 synthetic examples each; ``per_round`` clients train per round; only the
    last round evaluates (all clients). Only the LoRA factors and the classifier are trained
    (D ~ 1.1k) so that the server's N x D states do not hide the framework's own memory."""
    cfg = _base(
        f"perf-pool-{num_clients}",
        {"name": "tiny-bert", "max_length": 24,
         "peft": {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["classifier"]}},
        {"dataset": "synthetic-text", "num_clients": num_clients, "examples_per_client": 7,
         "partition": {"kind": "iid"}},
        {"local_epochs": 1, "batch_size": 16, "lr": 0.02},
        rounds=rounds,
        clients_per_round=min(per_round, num_clients),
    )
    cfg["federation"]["eval_every"] = 100_000  # evaluate in the last round only
    cfg["resources"]["max_actors"] = max_actors
    return cfg


# ---------------------------------------------------------------------------------- memory
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
                name = _process_name(p)
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

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _process_name(p: Any) -> str:
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
    return ", ".join(f"{k}{f' x{len(v)}' if len(v) > 1 else ''} {sum(v) / MIB:.0f}" for k, v in parts)


# ---------------------------------------------------------------------------------- results
@dataclass
class Run:
    """One measured run of one runner on one workload."""

    runner: str  # "floor" | "fedbip" | "flower-reload" | "flower-cached"
    workload: str  # model preset or "pool-N"
    rounds: list[float]  # wall seconds of each round
    whole: float  # seconds from process launch to exit (NaN when run in-process)
    peak_pss: float  # bytes, all processes of the run
    peak_procs: int
    accuracy: float | None  # mean over clients of the last round's test accuracy
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def steady(self) -> float:
        """Mean round time over rounds >= 2 (round 1 alone if there is only one)."""
        r = self.rounds[1:] if len(self.rounds) > 1 else self.rounds
        return float(np.mean(r)) if r else math.nan

    @property
    def startup(self) -> float:
        """Whole-run time not spent in rounds (start-up, model loading, shutdown)."""
        return self.whole - float(sum(self.rounds)) if self.rounds else math.nan


def _fail(runner: str, workload: str, error: str, whole: float = math.nan) -> Run:
    return Run(runner, workload, [], whole, math.nan, 0, None, error=error)


# ---------------------------------------------------------------------------------- plumbing
def child_env(extra_paths: Sequence[Path] = ()) -> dict[str, str]:
    """Environment for a measured child: ours on top of the current one, no RAY_ADDRESS (every
    run starts its own local Ray), the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CHILD_ENV)
    paths = [str(p) for p in (REPO, *extra_paths)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


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


def _tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log, without colour codes or warnings, on one line."""
    import re

    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
    except OSError:
        return ""
    keep = [ln.strip() for ln in text.splitlines()
            if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    return " | ".join(keep[-lines:])[-600:]


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def prepare_shards(cfg_dict: dict[str, Any], directory: Path) -> tuple[list[str], int, float]:
    """Write the Parquet shards of ``cfg_dict`` with fedbip's own ``build_shards`` (the floor and
    Flower read them). Returns (paths, number of labels, seconds it took)."""
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.data.shards import build_shards

    cfg = config_from_dict(cfg_dict)
    t0 = time.perf_counter()
    shards = build_shards(cfg.data, cfg.seed, directory)
    return [str(p) for p in shards.paths], shards.num_labels, time.perf_counter() - t0


def _digest(paths: Iterable[str | Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def warm_model_cache(model: str) -> None:
    """Build SmolLM2's one-time safetensors conversion before any timed run (both frameworks
    then load the same converted files)."""
    if model == "smollm2":
        from fedbip_ray.models.lm import smollm2_model_dir

        smollm2_model_dir()


# ---------------------------------------------------------------------------------- fedbip
class RoundClock:
    """fedbip ``RunCallback`` recording when the clients were ready and when each round ended
    (after its evaluation and checkpoint)."""

    def __init__(self) -> None:
        self.start = math.nan
        self.ends: list[float] = []

    def on_start(self, run: Any) -> None:
        self.start = time.perf_counter()

    def on_round(self, run: Any, row: dict[str, Any], report: dict[str, Any]) -> None:
        self.ends.append(time.perf_counter())

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        pass


def round_times(start: float, ends: Sequence[float]) -> list[float]:
    """Per-round seconds from the start instant and the end instant of every round."""
    out, prev = [], start
    for e in ends:
        out.append(e - prev)
        prev = e
    return out


def fedbip_child(job_path: str) -> int:
    """``--run-fedbip JOB``: one federation through ``run_federation`` (what ``fedbip run``
    calls), with a round clock; writes ``job["result"]``."""
    job = json.loads(Path(job_path).read_text())
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.runtime.federation import run_federation

    cfg = config_from_dict(job["config"])
    clock = RoundClock()
    summary = run_federation(cfg, job["output"], callbacks=[clock], echo=lambda s: None)
    _write_json(Path(job["result"]), {"start": clock.start, "ends": clock.ends, "summary": summary})
    return 0


def fedbip_phases(rows: Sequence[dict[str, Any]], times: Sequence[float]) -> list[dict[str, float]]:
    """Per-round split of fedbip's round time, from metrics.jsonl (``extra.*_seconds``) in the
    floor's terms: fit, aggregate, evaluate (validation gate included), and ``other`` = the
    round clock minus those (metrics line, checkpoint request, callbacks, the driver)."""
    out = []
    for row, total in zip(rows, times, strict=False):
        ex = row.get("extra", {})
        if "fit_seconds" not in ex:
            return []  # written by an older fedbip
        split = {"fit": ex["fit_seconds"], "aggregate": ex.get("aggregate_seconds", 0.0),
                 "evaluate": ex.get("gate_seconds", 0.0) + ex.get("eval_seconds", 0.0)}
        split["other"] = total - sum(split.values())
        out.append(split)
    return out


def _checkpoint_dim(output: Path) -> int | None:
    """D from the latest checkpoint's ``states`` tensor (None if not found)."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    for path in sorted((output / "checkpoints").rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as fh:
                if "states" in fh.keys():
                    return int(fh.get_slice("states").get_shape()[1])
        except Exception:  # noqa: BLE001 - another layout: fall back
            continue
    return None


def _fedbip_run(workload: str, cfg_dict: dict[str, Any], work: Path, inprocess: bool) -> Run:
    """Run one fedbip federation (subprocess unless ``inprocess``) and collect its figures."""
    out = work / "fedbip-output"
    shutil.rmtree(out, ignore_errors=True)
    result = work / "fedbip-result.json"
    job = _write_json(work / "fedbip-job.json",
                      {"config": cfg_dict, "output": str(out), "result": str(result)})
    if inprocess:
        from fedbip_ray.runtime.federation import ensure_ray

        ensure_ray()
        with TreeMemorySampler(os.getpid()) as sampler:
            try:
                rc = fedbip_child(str(job))
            except Exception as exc:  # noqa: BLE001 - reported in the table
                return _fail("fedbip", workload, f"{type(exc).__name__}: {exc}"[:300])
        wall, log = math.nan, None
    else:
        log = work / "fedbip.log"
        rc, wall, sampler = run_measured([sys.executable, str(THIS), "--run-fedbip", str(job)],
                                         child_env(), log)
    if rc != 0 or not result.is_file():
        return _fail("fedbip", workload, f"exit {rc}: {_tail(log) if log else ''}", wall)
    res = json.loads(result.read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    acc = res["summary"].get("mean_accuracy")
    times = round_times(res["start"], res["ends"])
    return Run("fedbip", workload, times, wall, sampler.peak,
               sampler.peak_procs, acc,
               extra={"metrics": rows, "peak_top": top_processes(sampler.peak_top),
                      "phases": fedbip_phases(rows, times),
                      "dim": _checkpoint_dim(out),
                      "shards_digest": _digest(sorted((out / "shards").glob("client_*.parquet"))),
                      "num_clients": cfg_dict["data"]["num_clients"]})


# ---------------------------------------------------------------------------------- floor
def sample_clients(num_clients: int, k: int, seed: int, round_num: int) -> list[int]:
    """The clients of a round, drawn exactly as ``fedbip_ray.runtime.federation.sample_clients``
    does (kept here so that the floor does not import Ray; a test checks they agree)."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, round_num])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def plan_workers(cfg_dict: dict[str, Any], cpus: int) -> tuple[int, int]:
    """(workers, torch threads per worker) of the floor: what fedbip's ``plan_actors`` gives on
    ``cpus`` CPUs, and the thread count Ray gives an actor (``OMP_NUM_THREADS = num_cpus``)."""
    res = cfg_dict.get("resources", {})
    per = float(res.get("num_cpus_per_client", 1.0))
    n = int(cfg_dict["data"]["num_clients"])
    workers = min(n, int(cpus // per) if per > 0 else n)
    if res.get("max_actors"):
        workers = min(workers, int(res["max_actors"]))
    return max(1, workers), max(1, int(per))


def floor_worker(conn: Any, cfg_dict: dict[str, Any], num_labels: int, paths: dict[int, str],
                 threads: int) -> None:
    """A plain worker process: loads the model once, then serves ``fit``/``evaluate`` requests
    for any client exactly as ``ClientActor.fit``/``evaluate`` do."""
    import torch

    torch.set_num_threads(threads)
    from fedbip_ray.config import Config
    from fedbip_ray.data.shards import read_shard
    from fedbip_ray.runtime.trainer import make_trainer, seed_for

    cfg = Config.model_validate(cfg_dict)
    trainer = make_trainer(cfg, num_labels)
    conn.send(("ready", trainer.initial_state(), trainer.layout.to_dict(), torch.get_num_threads()))
    data: dict[int, dict[str, Any]] = {}

    def client_data(cid: int) -> dict[str, Any]:
        if cid not in data:
            frames = read_shard(Path(paths[cid]).read_bytes())
            data[cid] = {s: trainer.encode(f) for s, f in frames.items()}
        return data[cid]

    while True:
        kind, items = conn.recv()
        if kind == "stop":
            break
        out = []
        for cid, state, rnd in items:
            d = client_data(cid)
            trainer.load_state(state)
            if kind == "fit":
                metrics = trainer.train(d["train"], cfg.train.local_epochs, seed_for(cfg.seed, cid, rnd), 0.0)
                tau = trainer.current_state() - np.asarray(state, dtype=np.float32)
                out.append((cid, tau.astype(np.float32, copy=False), len(d["train"]), metrics))
            else:
                out.append((cid, {s: trainer.evaluate(d[s]) for s in ("val", "test")}))
        conn.send(out)
    conn.close()


def floor_child(job_path: str) -> int:
    """``--run-floor JOB``: the compute floor of a FedAvg federation; writes ``job["result"]``."""
    import multiprocessing as mp

    from fedbip_ray.core.strategies import AggregationInput, make_strategy
    from fedbip_ray.core.taskvector import Layout

    job = json.loads(Path(job_path).read_text())
    cfg = job["config"]
    n, rounds, seed = int(cfg["data"]["num_clients"]), int(cfg["federation"]["rounds"]), int(cfg["seed"])
    fed = cfg["federation"]
    k = int(fed.get("clients_per_round") or max(1, math.ceil(float(fed.get("fraction", 1.0)) * n)))
    eval_every = int(fed.get("eval_every", 1))
    workers, threads = plan_workers(cfg, int(job["cpus"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what Ray sets for a num_cpus=threads actor
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    shards = {c: job["shards"][c] for c in range(n)}
    for _ in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=floor_worker, args=(child, cfg, int(job["num_labels"]), shards, threads))
        proc.start()
        conns.append(parent)
        procs.append(proc)
    ready = [c.recv() for c in conns]
    init, layout = np.asarray(ready[0][1], dtype=np.float32), Layout.from_dict(ready[0][2])
    states = np.tile(init, (n, 1))
    strategy = make_strategy(cfg["strategy"]["name"], cfg["strategy"].get("params", {}))
    start, ends, accuracy = time.perf_counter(), [], None

    seconds: dict[str, dict[int, float]] = {"fit": {}, "eval": {}}

    def scatter(kind: str, items: list[tuple[int, np.ndarray, int]]) -> list[Any]:
        """One item in flight per worker, dispatched as fedbip's dispatch does: a free worker
        takes its own next client (c mod W) longest first by the client's last call of this
        kind, else the cheapest one queued for the worker with the most work left."""
        from multiprocessing.connection import wait

        from fedbip_ray.runtime.scheduling import home_queues, take_next

        by_client = {it[0]: it for it in items}
        cost = seconds[kind]
        queues = home_queues(list(by_client), workers, cost=cost)
        out: list[Any] = []
        busy: dict[Any, tuple[int, int, float]] = {}

        def feed(w: int) -> None:
            c = take_next(queues, w, cost)
            if c is not None:
                busy[conns[w]] = (w, c, time.monotonic())
                conns[w].send((kind, [by_client[c]]))

        for w in range(workers):
            feed(w)
        while busy:
            for conn in wait(list(busy)):
                out.extend(conn.recv())
                w, c, t = busy.pop(conn)
                cost[c] = time.monotonic() - t
                feed(w)
        return out

    phases = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        part = sample_clients(n, k, seed, rnd)
        fits = sorted(scatter("fit", [(c, states[c], rnd) for c in part]), key=lambda r: r[0])
        t1 = time.perf_counter()
        idx = np.asarray([r[0] for r in fits], dtype=np.int64)
        inp = AggregationInput(states=states[idx], deltas=np.stack([r[1] for r in fits]),
                               counts=np.asarray([r[2] for r in fits], dtype=np.int64),
                               layout=layout, init=init)
        states[idx] = strategy.aggregate(inp).states
        t2 = time.perf_counter()
        if rnd % eval_every == 0 or rnd == rounds:
            evals = scatter("eval", [(c, states[c], rnd) for c in range(n)])
            accs = [e[1]["test"]["accuracy"] for e in evals]
            accuracy = float(np.nanmean(accs)) if accs else None
        ends.append(time.perf_counter())
        phases.append({"fit": t1 - t0, "aggregate": t2 - t1, "evaluate": ends[-1] - t2})
    for conn in conns:
        conn.send(("stop", []))
    for proc in procs:
        proc.join()
    _write_json(Path(job["result"]), {"start": start, "ends": ends, "accuracy": accuracy,
                                      "dim": int(layout.size), "workers": workers, "phases": phases,
                                      "torch_threads": [r[3] for r in ready]})
    return 0


def _floor_run(workload: str, cfg_dict: dict[str, Any], shards: list[str], num_labels: int,
               work: Path, cpus: int) -> Run:
    result = work / "floor-result.json"
    job = _write_json(work / "floor-job.json", {"config": cfg_dict, "shards": shards, "num_labels": num_labels,
                                                "cpus": cpus, "result": str(result)})
    log = work / "floor.log"
    rc, wall, sampler = run_measured([sys.executable, str(THIS), "--run-floor", str(job)], child_env(), log)
    if rc != 0 or not result.is_file():
        return _fail("floor", workload, f"exit {rc}: {_tail(log)}", wall)
    res = json.loads(result.read_text())
    return Run("floor", workload, round_times(res["start"], res["ends"]), wall, sampler.peak,
               sampler.peak_procs, res["accuracy"],
               extra={"dim": res["dim"], "workers": res["workers"], "torch_threads": res["torch_threads"],
                      "phases": res["phases"], "peak_top": top_processes(sampler.peak_top)})


# ---------------------------------------------------------------------------------- flower
def _flower_run(workload: str, variant: str, cfg_dict: dict[str, Any], shards: list[str],
                num_labels: int, work: Path, cpus: int, python: str) -> Run:
    """The same federation under Flower's simulation engine (its own venv)."""
    runner = f"flower-{variant}"
    if not Path(python).is_file():
        return _fail(runner, workload, f"Flower venv python {python} not found "
                     "(bash benchmarks/flower_baseline/setup_venv.sh)")
    result = work / f"{runner}-result.json"
    result.unlink(missing_ok=True)
    n = int(cfg_dict["data"]["num_clients"])
    job = _write_json(work / f"{runner}-job.json", {
        "config": cfg_dict, "shards": shards, "num_labels": num_labels, "num_clients": n,
        "rounds": int(cfg_dict["federation"]["rounds"]), "variant": variant, "cpus": cpus,
        "client_num_cpus": float(cfg_dict["resources"]["num_cpus_per_client"]), "result": str(result)})
    log = work / f"{runner}.log"
    cmd = [python, str(FLOWER_DIR / "run.py"), str(job)]
    rc, wall, sampler = run_measured(cmd, child_env([REPO / "benchmarks"]), log)
    if rc != 0 or not result.is_file():
        return _fail(runner, workload, f"exit {rc}: {_tail(log)}", wall)
    res = json.loads(result.read_text())
    if sum(res.get("failures") or []):
        return _fail(runner, workload, f"{sum(res['failures'])} client failures: {_tail(log)}", wall)
    return Run(runner, workload, round_times(res["start"], res["ends"]), wall, sampler.peak,
               sampler.peak_procs, res.get("accuracy"),
               extra={**{k: res.get(k) for k in ("loads", "load_seconds", "compute_seconds",
                                                 "server_init_seconds", "torch_threads", "flwr", "ray")},
                      "peak_top": top_processes(sampler.peak_top)})


# ---------------------------------------------------------------------------------- sections
def with_retries(retries: int, run: Callable[..., Run], *args: Any) -> Run:
    """``run(*args)``, repeated up to ``retries`` times while it fails before completing any
    round (e.g. a Ray cluster killed at start-up by someone's ``ray stop``); the first error is
    kept in ``extra["retried_after"]`` and shown in the report."""
    first = run(*args)
    result = first
    for _ in range(retries):
        if not result.error or result.rounds:
            break
        _log(f"  retrying after: {result.error[:200]}")
        result = run(*args)
    if result is not first:
        result.extra["retried_after"] = first.error
    return result


@dataclass
class Workload:
    """A model preset with its shards, shared by the runners that do the same work."""

    model: str
    config: dict[str, Any]
    shards: list[str]
    num_labels: int
    shard_seconds: float
    work: Path


def comparison_runs(models: Sequence[str], runners_for: Callable[[str], Sequence[str]],
                    args: argparse.Namespace, work: Path, cache: dict[tuple[str, str], Run]) -> None:
    """Run every (model, runner) pair not yet in ``cache`` (floor, fedbip, flower-*)."""
    for model in models:
        wanted = [r for r in runners_for(model) if (model, r) not in cache]
        if not wanted:
            continue
        cfg = model_config(model, args.quick)
        if args.rounds:
            cfg["federation"]["rounds"] = args.rounds
        wdir = work / model
        wdir.mkdir(parents=True, exist_ok=True)
        warm_model_cache(model)
        shards, num_labels, secs = prepare_shards(cfg, wdir / "shards")
        wl = Workload(model, cfg, shards, num_labels, secs, wdir)
        for runner in wanted:
            _log(f"[{model}] {runner} ...")
            if runner == "floor":
                run = with_retries(args.retries, _floor_run, model, cfg, shards, num_labels, wdir,
                                   args.cpus)
            elif runner == "fedbip":
                run = with_retries(args.retries, _fedbip_run, model, cfg, wdir, args.inprocess)
                if not run.error and run.extra.get("shards_digest") != _digest(shards):
                    run.extra["shards_differ"] = True
            else:
                run = with_retries(args.retries, _flower_run, model, runner.removeprefix("flower-"),
                                   cfg, shards, num_labels, wdir, args.cpus, args.flower_python)
            run.extra["workload"] = dataclasses.asdict(wl) | {"work": str(wdir)}
            cache[(model, runner)] = run
            _log(f"[{model}] {runner}: {_brief(run)}")


def pool_runs(args: argparse.Namespace, work: Path) -> list[Run]:
    """Pool mode: one fedbip run per N."""
    runs = []
    for n in args.pool_n:
        cfg = pool_config(n, args.pool_per_round, args.pool_rounds, args.pool_actors)
        wdir = work / f"pool-{n}"
        wdir.mkdir(parents=True, exist_ok=True)
        _log(f"[pool] N={n} ...")
        run = with_retries(args.retries, _fedbip_run, f"pool-{n}", cfg, wdir, args.inprocess)
        run.extra["num_clients"] = n
        run.extra["per_round"] = min(args.pool_per_round, n)
        run.extra["actors"] = args.pool_actors
        runs.append(run)
        _log(f"[pool] N={n}: {_brief(run)}")
    return runs


# ---------------------------------------------------------------------------------- aggregation
def lora_layout(dim: int, n_params: int = 24) -> Any:
    """A LoRA-like layout of ``n_params`` flat parameters holding ``dim`` values in total."""
    from fedbip_ray.core.taskvector import Layout

    sizes = [dim // n_params + (1 if j < dim % n_params else 0) for j in range(n_params)]
    names = [f"base_model.model.layer.{j // 4}.attention.{'query' if j % 4 < 2 else 'value'}"
             f".lora_{'AB'[j % 2]}.default.weight" for j in range(n_params)]
    return Layout.from_shapes({name: (size,) for name, size in zip(names, sizes, strict=True)})


def _make_update(client_id: int, round_num: int, dim: int, layout: dict[str, Any]) -> Any:
    """A client's update as a client actor returns it: (D,) float32 task vector (a shared
    direction plus noise, so cosines are positive)."""
    from fedbip_ray.runtime.messages import ClientUpdate

    rng = np.random.default_rng([client_id, round_num])
    vec = rng.standard_normal(dim, dtype=np.float32)
    vec *= np.float32(0.01)
    vec += np.float32(0.01)
    return ClientUpdate(client_id, round_num, vec, layout, 10 + client_id % 7, {"train_loss": 0.5})


def _actor_pid(self: Any) -> int:
    return os.getpid()


def _trace_start(self: Any) -> int:
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    return tracemalloc.get_traced_memory()[0]


def _trace_stop(self: Any) -> int:
    import tracemalloc

    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def _held(self: Any) -> int:
    """Bytes of the numpy arrays the server object keeps (walks its attributes)."""
    seen: set[int] = set()

    def size(obj: Any, depth: int = 0) -> int:
        if id(obj) in seen or depth > 4:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            return int(obj.nbytes) if obj.base is None else size(obj.base, depth + 1)
        if isinstance(obj, dict):
            return sum(size(v, depth + 1) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(size(v, depth + 1) for v in obj)
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
        return float(self.n) * self.d * 4

    @property
    def need(self) -> float | None:
        """Bytes this case needs at its peak beyond fixed baselines: the updates in the object
        store + the numpy arrays the server keeps between rounds (its states, the last round's
        task vectors, ...) + the call's allocations; scales with N x D."""
        if self.traced_peak is None or self.held_before is None:
            return None
        return self.matrix + self.held_before + self.traced_peak


def aggregation_rows(cases: Sequence[tuple[int, int]], strategies: Sequence[str],
                     force: bool) -> list[AggRow]:
    """``aggregate_refs`` of N updates inside a real ServerActor for each (N, D) case (in
    ascending N x D), with the updates produced by Ray tasks into the object store as client
    actors do. Cases predicted not to fit into the available memory (from the last measured
    allocations / M) are skipped unless ``force``."""
    import psutil
    import ray

    from fedbip_ray.runtime.federation import ray_env_defaults

    try:  # our module may be loaded from a path (fedbip bench): ship functions by value
        from ray import cloudpickle

        mod = sys.modules.get(__name__)
        if mod is not None and __name__ != "__main__":
            cloudpickle.register_pickle_by_value(mod)
    except Exception:  # noqa: BLE001 - by-value pickling is the default for unknown modules
        pass
    started, tmp = False, None
    if not ray.is_initialized():
        ray_env_defaults()
        total = psutil.virtual_memory().total
        biggest = max(n * d for n, d in cases) * 4
        store = int(min(biggest * 1.1 + 512 * MIB, 0.6 * total))
        tmp = tempfile.mkdtemp(prefix="rayperf", dir="/tmp")
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 object_store_memory=store, logging_level="ERROR", log_to_driver=False,
                 _temp_dir=tmp, _node_ip_address="127.0.0.1")
        started = True
    make = ray.remote(num_cpus=1)(_make_update)
    rows: list[AggRow] = []
    ratios = dict.fromkeys(strategies, 7.0)  # need / (N x D x 4), updated per measured case
    todo = [(n, d, st) for n, d in sorted(cases, key=lambda c: (c[0] * c[1], c[0])) for st in strategies]
    try:
        for n, dim, strategy in todo:
            layout = lora_layout(dim)
            ratio = ratios[strategy]
            row = AggRow(n, dim, strategy)
            rows.append(row)
            predicted = ratio * row.matrix + 2 * GIB  # store + actor + allocations + Ray, baselines
            vm = psutil.virtual_memory()
            avail = vm.available - 0.05 * vm.total  # Ray's memory monitor kills at 95% used
            if predicted > avail and not force:
                row.skipped = (f"skipped: predicted {predicted / GIB:.1f} GiB "
                               f"(~{ratio:.2f} x N*D*4 + 2 GiB) > available {avail / GIB:.1f} GiB")
                _log(f"[aggregation] N={n}: {row.skipped}")
                continue
            _log(f"[aggregation] N={n} D={dim} {strategy} ...")
            try:
                _measure_aggregation(row, make, layout, strategy)
            except Exception as exc:  # noqa: BLE001 - e.g. killed by Ray's memory monitor
                row.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                _log(f"[aggregation] N={n}: {row.skipped}")
                continue
            if row.need:
                ratios[strategy] = row.need / row.matrix  # predicts the next (larger) case
            _log(f"[aggregation] N={n} {strategy}: {row.seconds:.2f}s, "
                 f"allocations {(row.traced_peak or 0) / GIB:.2f} GiB")
    finally:
        if started:
            ray.shutdown()
            shutil.rmtree(tmp or "", ignore_errors=True)
    return rows


def _measure_aggregation(row: AggRow, make: Any, layout: Any, strategy: str) -> None:
    """Fill ``row``: one timed call, then one call under tracemalloc (fresh updates each)."""
    import ray

    from fedbip_ray.runtime.server import ServerActor

    n, dim = row.n, row.d
    # the validation gate (a client-side step, and one more N x D copy held until it runs)
    # is not part of the server's aggregation: measured without it
    params = {"gate": []} if strategy.startswith("fedbip") else {}
    server = ServerActor.options(num_cpus=0).remote(strategy, params, n)
    try:
        row.actor_base = float(ray.get(server.__ray_call__.remote(_uss)))
        row.threads = ray.get(server.__ray_call__.remote(_blas_threads))
        ray.get(server.initialize.remote(np.zeros(dim, dtype=np.float32), layout.to_dict()))
        pid = ray.get(server.__ray_call__.remote(_actor_pid))
        for rnd, traced in ((1, False), (2, True)):
            refs = [make.remote(c, rnd, dim, layout.to_dict()) for c in range(n)]
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
            before = ray.get(server.__ray_call__.remote(_uss))
            held = ray.get(server.__ray_call__.remote(_held))
            if traced:
                ray.get(server.__ray_call__.remote(_trace_start))
            with TreeMemorySampler(pid, 0.1, "uss") as actor_s, TreeMemorySampler(os.getpid(), 0.25) as all_s:
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
            row.accepted = len(report["accepted"])
            row.store_bytes = float(n) * dim * 4
            del refs, report
            gc.collect()
    finally:
        ray.kill(server)
        gc.collect()


# ---------------------------------------------------------------------------------- report
def _f(x: float | None, fmt: str = ".2f", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:{fmt}}{unit}"


def _gb(x: float | None) -> str:
    return _f(None if x is None else x / GIB, ".2f")


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def _goal(value: float | None, limit: float) -> str:
    if value is None or math.isnan(value):
        return "not measured"
    return f"{value:.2f} (goal <= {limit:g}: {'met' if value <= limit else 'NOT met'})"


def _rounds(run: Run) -> str:
    return " / ".join(f"{t:.2f}" for t in run.rounds) if run.rounds else "-"


def _brief(run: Run) -> str:
    if run.error:
        return f"FAILED ({run.error})"
    return (f"rounds {_rounds(run)} s, steady {run.steady:.2f} s, whole {run.whole:.1f} s, "
            f"peak {run.peak_pss / GIB:.2f} GiB")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_table(runs: Sequence[Run], reference: Run | None, ref_label: str) -> list[str]:
    """Markdown rows: per-round times, steady mean, ratio to ``reference``, whole run, memory."""
    lines = [
        f"| runner | seconds per round (r1 / r2 / ...) | steady mean, rounds >= 2 (s) | steady / {ref_label} "
        "| whole run (s) | start-up + shutdown (s) | peak memory, all processes (GiB PSS) | processes at peak "
        "| final mean test accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if r.error:
            lines.append(f"| {r.runner} | FAILED: {r.error} | | | | | | | |")
            continue
        ratio = _ratio(r.steady, reference.steady) if reference and not reference.error else "n/a"
        lines.append(
            f"| {r.runner} | {_rounds(r)} | {r.steady:.2f} | {ratio} | {_f(r.whole, '.1f')} "
            f"| {_f(r.startup, '.1f')} | {_gb(r.peak_pss)} | {r.peak_procs} | {_f(r.accuracy, '.3f')} |"
        )
    return lines


def peak_lines(runs: Sequence[Run]) -> list[str]:
    """Largest process kinds at each run's memory peak, and each run's steady phase split."""
    out = []
    for r in runs:
        if r.extra.get("retried_after"):
            out.append(f"- {r.runner} was re-run once; its first attempt failed at start-up: "
                       f"{r.extra['retried_after'][:200]}")
        if r.error:
            continue
        if r.extra.get("peak_top"):
            out.append(f"- {r.runner}, largest processes at the peak (MiB PSS): {r.extra['peak_top']}")
        phases = r.extra.get("phases")
        if phases and len(phases) > 1:
            mean = {k: float(np.mean([p[k] for p in phases[1:]])) for k in phases[0]}
            out.append(f"- {r.runner}, steady round split (s): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))
    return out


def _describe(cfg: dict[str, Any]) -> str:
    m, d, t, f = cfg["model"], cfg["data"], cfg["train"], cfg["federation"]
    task = m.get("task", "sequence-classification")
    return (f"model `{m['name']}` ({task}, LoRA r={m['peft']['r']}), dataset `{d['dataset']}`, "
            f"{d['num_clients']} clients x {d['examples_per_client']} examples (partition "
            f"`{d['partition']['kind']}`; 60/15/25 train/val/test), {t['local_epochs']} local epoch(s), "
            f"batch {t['batch_size']}, {f['rounds']} rounds, FedAvg, every client evaluated on its "
            f"val and test split every round, client num_cpus=1 (2 clients at a time on 2 CPUs)")


def overhead_section(cache: dict[tuple[str, str], Run], models: Sequence[str]) -> list[str]:
    out = ["## 1. Orchestration overhead: fedbip-ray against the compute floor", "",
           "Floor = the same local training and evaluation (`make_trainer` -> `LocalTrainer`, the same "
           "Parquet shards, the same seeds) in plain `multiprocessing` worker processes, as many as "
           "fedbip starts client actors, each with the torch thread count Ray gives an actor "
           "(`OMP_NUM_THREADS = num_cpus`), the model loaded once per worker, clients dealt to workers "
           "as fedbip dispatches them to actors (one client in flight per worker; a free worker takes its "
           "own next client, c mod W, longest first by the client's last call of the phase, else the "
           "cheapest one queued for the worker with the most work left), FedAvg in the parent. "
           "fedbip rounds include aggregation in the server actor, moving states and task vectors "
           "through the object store, metrics.jsonl and the per-round checkpoint.", ""]
    for model in models:
        floor, fed = cache.get((model, "floor")), cache.get((model, "fedbip"))
        if floor is None or fed is None:
            continue
        cfg = fed.extra.get("workload", {}).get("config") or floor.extra.get("workload", {}).get("config")
        out += [f"### {model}", "", f"Work: {_describe(cfg)}." if cfg else "", ""]
        out += run_table([floor, fed], floor, "floor")
        out += ["", *peak_lines([floor, fed])]
        if not floor.error and not fed.error:
            ratio = fed.steady / floor.steady
            out += ["", f"Steady-state overhead: {fed.steady - floor.steady:+.2f} s per round; ratio "
                    f"{_goal(ratio, 1.05)}. D = {floor.extra.get('dim')} trainable values; floor "
                    f"workers {floor.extra.get('workers')} with torch threads {floor.extra.get('torch_threads')}."]
            if fed.extra.get("shards_differ"):
                out.append("WARNING: fedbip's shards differ from the ones the floor read.")
        out.append("")
    return out


def flower_section(cache: dict[tuple[str, str], Run], models: Sequence[str],
                   variants: Sequence[str]) -> list[str]:
    out = ["## 2. Side by side with Flower 1.42 (simulation engine)", "",
           "Flower runs in its own venv (flwr[simulation]==1.42.0 pins ray==2.55.1; fedbip uses "
           "ray 2.60.0): `benchmarks/flower_baseline/` (ServerApp + ClientApp, `run_simulation`, "
           "`FedAvg` from `flwr.serverapp.strategy`, `client_resources={num_cpus: 1}`). Its ClientApp "
           "calls the same trainer class (`fedbip_ray.runtime.trainer.make_trainer`; no Ray inside) "
           "on the same Parquet shards, with the same seeds, so the computation per client is identical. "
           "Messages carry only the adapter state (D floats), as fedbip does. Variants: "
           "**flower-reload** builds the model for every message, as Flower's Hugging Face app "
           "template does (`flwr new`, `client.huggingface.py.tpl`: the model is loaded in `client_fn`); "
           "**flower-cached** keeps one model per Ray worker process in a module-level cache (the "
           "workaround of Flower's FlowerTune LLM template); **flower-reload-gguf** (SmolLM2 only) builds "
           "the model for every message from the packaged GGUF file, as `from_pretrained(dir, gguf_file=...)` "
           "in `client_fn` does, without fedbip's one-time conversion cache (each build also writes the "
           "converted copy into a fresh temporary directory and loads it from there). All cache the "
           "tokenized data per process. "
           "Whole run = process launch to exit (imports, Ray start, model loads, rounds, shutdown); "
           "fedbip's also includes writing the shards (the Flower and floor runs read pre-written ones).",
           ""]
    for model in models:
        fed = cache.get((model, "fedbip"))
        flowers = [cache[(model, f"flower-{v}")] for v in variants if (model, f"flower-{v}") in cache]
        if fed is None or not flowers:
            continue
        cfg = fed.extra.get("workload", {}).get("config")
        primary = flowers[0]
        out += [f"### {model}", "", f"Work: {_describe(cfg)}." if cfg else "", ""]
        out += run_table([fed, *flowers], primary if not primary.error else None, primary.runner)
        out += ["", *peak_lines([fed, *flowers]), ""]
        for fl in flowers:
            if fl.error or fed.error:
                continue
            loads = fl.extra.get("loads") or []
            secs = fl.extra.get("load_seconds") or []
            out.append(
                f"- vs {fl.runner}: steady round {_goal(fed.steady / fl.steady, 1.0)}"
                + (f"; SmolLM2 round goal {_goal(fed.steady / fl.steady, 0.5)}" if model == "smollm2" else "")
                + f"; whole run {_goal(fed.whole / fl.whole, 0.9)}; peak memory {_goal(fed.peak_pss / fl.peak_pss, 0.7)}. "
                f"{fl.runner}'s clients built the model {' / '.join(str(x) for x in loads) or 0} times "
                f"in rounds {'/'.join(str(i + 1) for i in range(len(loads)))} "
                f"({' / '.join(f'{x:.1f}' for x in secs) or 0} s, summed over its workers; training and "
                f"evaluation inside the ClientApp took "
                f"{' / '.join(f'{x:.1f}' for x in fl.extra.get('compute_seconds') or [])} s) plus once in "
                f"the ServerApp for the initial arrays "
                f"({_f(fl.extra.get('server_init_seconds'))} s); torch threads in its workers: "
                f"{sorted(set(fl.extra.get('torch_threads') or []))}.")
        by = {fl.runner: fl for fl in flowers if not fl.error}
        for name in ("flower-reload", "flower-reload-gguf"):
            if name in by and "flower-cached" in by:
                out.append(f"- Cost of building the model per message: {name}'s steady round is "
                           f"{by[name].steady - by['flower-cached'].steady:+.2f} s longer than "
                           "flower-cached's.")
        wl = fed.extra.get("workload") or {}
        if wl.get("shard_seconds") is not None and not fed.error:
            out.append(f"- fedbip's whole run includes building the shards: {wl['shard_seconds']:.1f} s "
                       "when measured on its own. Round 1 of Flower includes its workers' first imports "
                       "(torch, transformers), which fedbip's actors do before round 1.")
        out.append("")
    return out


def pool_section(runs: Sequence[Run]) -> list[str]:
    out = ["## 3. Many clients on a fixed pool of actors", "",
           "fedbip dispatches clients to a fixed set of client actors (`resources.max_actors`; "
           "client c's home actor is c mod A, a free actor also takes clients queued for a busy one, "
           "`federation.dispatch`); every actor holds the base model once and "
           "receives each client's adapter state from the server actor with every call, so N only adds "
           "server-side states (N x D float32), per-client shards in the object store and each actor's "
           "cache of its clients' tokenized data. tiny-bert (LoRA + classifier, D below), 7 synthetic "
           "examples per client, a fixed number of clients per round; only the last round evaluates, "
           "and it evaluates all N clients.", "",
           "| N clients | actors | clients per round | train rounds (s) | steady train round, rounds 2..R-1 (s) "
           "| last round: train + evaluate all N (s) | eval s per client | whole run (s) "
           "| peak memory, all processes (GiB PSS) | processes at peak | server states N x D x 4 (MiB) |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        n = r.extra.get("num_clients")
        if r.error:
            out.append(f"| {n} | FAILED: {r.error} | | | | | | | | | |")
            continue
        train = r.rounds[:-1]
        steady = float(np.mean(train[1:])) if len(train) > 1 else (train[0] if train else math.nan)
        last = r.rounds[-1] if r.rounds else math.nan
        per_eval = (last - steady) / n if n and not math.isnan(steady) else math.nan
        dim = r.extra.get("dim")
        states = n * dim * 4 / MIB if dim else None
        out.append(
            f"| {n} | {r.extra.get('actors')} | {r.extra.get('per_round')} | "
            f"{' / '.join(f'{t:.2f}' for t in train)} | {steady:.2f} | {last:.2f} | {per_eval:.4f} "
            f"| {_f(r.whole, '.1f')} | {_gb(r.peak_pss)} | {r.peak_procs} | {_f(states, '.2f')} |")
    ok = [r for r in runs if not r.error]
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        out += ["", f"Peak memory from N={lo.extra['num_clients']} to N={hi.extra['num_clients']}: "
                f"{_gb(lo.peak_pss)} -> {_gb(hi.peak_pss)} GiB ({_ratio(hi.peak_pss, lo.peak_pss)}). "
                f"D = {hi.extra.get('dim')}."]
    out.append("")
    return out


def aggregation_section(rows: Sequence[AggRow]) -> list[str]:
    total = _total_memory()
    out = ["## 4. Server-side aggregation at scale (inside a real ServerActor)", "",
           "N client updates ((D,) float32 task vectors in `ClientUpdate` messages) are produced by Ray "
           "tasks into the object store, as client actors produce them, and their ObjectRefs are handed "
           "to `ServerActor.aggregate_refs` (fetch, validate, `FederatedServer.aggregate`: stack, strategy, "
           "write back), as the round loop does. Time: the call without tracing. Memory (a second call, "
           "new updates): allocations made during the call by tracemalloc inside the actor; the numpy "
           "arrays the server object keeps from before the call (its states, the previous round's "
           "task vectors); the actor's private memory (USS) before and at peak (it includes freed memory "
           "the allocator keeps, which dominates at small sizes); PSS of all processes (the benchmark "
           "process, Ray's processes, the object store holding the N updates). M = N x D x 4 bytes = one stacked "
           f"matrix of task vectors (and the size of the server's states). Machine memory: {total / GIB:.1f} GiB.",
           "",
           "| N | D | strategy | M | aggregate_refs (s) | allocations during call | / M "
           "| actor USS before -> peak | need: store + kept arrays + allocations | / M "
           "| all processes peak (PSS) | fits in machine memory |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.skipped:
            verdict = "no (predicted)" if r.skipped.startswith("skipped") else "no (failed)"
            out.append(f"| {r.n} | {r.d:,} | {r.strategy} | {_bytes(r.matrix)} | {r.skipped} | | | | | | | {verdict} |")
            continue
        fits = "yes" if r.total_pss_peak and r.total_pss_peak < total else "no"
        out.append(
            f"| {r.n} | {r.d:,} | {r.strategy} | {_bytes(r.matrix)} | {_f(r.seconds)} | {_bytes(r.traced_peak)} "
            f"| {_ratio(r.traced_peak, r.matrix)} | {_bytes(r.actor_uss_before)} -> {_bytes(r.actor_uss_peak)} "
            f"| {_bytes(r.need)} | {_ratio(r.need, r.matrix)} | {_bytes(r.total_pss_peak)} | {fits} |")
    big = 1000 * 1_000_000 * 4
    for strategy in dict.fromkeys(r.strategy for r in rows):
        measured = [r for r in rows if r.traced_peak and r.strategy == strategy]
        if not measured:
            continue
        ratios = [r.traced_peak / r.matrix for r in measured]  # type: ignore[operator]
        kept = [(r.held_before or 0) / r.matrix for r in measured]
        need = (measured[-1].need or 0) / measured[-1].matrix
        flat = max(ratios) <= 1.15 * min(ratios)
        verdict = ("constant across sizes, so memory is linear in N x D: no N^2 copies of task vectors"
                   if flat else "NOT constant across sizes: look for copies that grow faster than N x D")
        out += ["", f"**{strategy}**: allocations per M across (N, D) = "
                f"{', '.join(f'({r.n}, {r.d:g})' for r in measured)}: {', '.join(f'{x:.2f}' for x in ratios)}"
                f" -- {verdict} (the N x N "
                f"similarity/weight matrices are N^2 x 8 bytes, {measured[-1].n ** 2 * 8 / MIB:.1f} MiB at "
                f"N={measured[-1].n}). Between rounds the server keeps numpy arrays of "
                f"{', '.join(f'{x:.2f}' for x in kept)} x M (its states and what it keeps from the last "
                f"round); the actor's baseline is {_bytes(measured[-1].actor_base)}. "
                f"At N = 1000, D = 1e6 (M = {_bytes(big)}) the largest measured case predicts "
                f"{need:.2f} x M = {_bytes(need * big)} (object store + kept arrays + the call's "
                f"allocations), plus the baselines of the actor and Ray's own processes (~1 GiB), against "
                f"{total / GIB:.1f} GiB of machine memory."]
    threads = next((r.threads for r in rows if r.threads), None)
    if threads:
        out += ["", f"The server actor (`num_cpus=0`) runs numpy with {threads}."]
    out += ["", "Where the allocations come from (`FederatedServer.aggregate` and the strategies, read "
            "from the code): `np.stack(vecs)` of the received task vectors (1 M); the strategy's new "
            "states (1 M: `W @ deltas + states` for FedBip, `np.repeat` of the average for FedAvg); the "
            "finiteness check runs in blocks of 64 rows (no N x D bool array). The participants' "
            "states are passed as a view when they are contiguous (a copy, 1 M, otherwise), and "
            "strategies that compare parameters (`reference: pretrained`, `lora_product`) form "
            "theta = states + deltas one column block at a time, not as an N x D copy. The N updates "
            "stay in the object store (1 M, read zero-copy), the server's states are another M. The "
            "server keeps the last round's stacked task vectors until the next aggregation only "
            "when a replay recorder asks for them (`keep_last_round`: 1 M more between rounds, not "
            "measured here). With the validation gate on "
            "(not measured here) the server also keeps each participant's own-training state until "
            "the gate has run (1 M)."]
    out.append("")
    return out


def bytes_per_round(r: Run) -> tuple[float, float, float, float | None]:
    """(participants k, bytes_in, bytes_out, minimum 2 x k x D x 4) per round, means over the
    run's metrics.jsonl rows."""
    rows, dim = r.extra["metrics"], r.extra.get("dim")
    k = float(np.mean([len(x.get("participants", [])) for x in rows]))
    b_in = float(np.mean([x.get("bytes_in", 0) for x in rows]))
    b_out = float(np.mean([x.get("bytes_out", 0) for x in rows]))
    return k, b_in, b_out, (2 * k * dim * 4 if dim else None)


def goals_section(cache: dict[tuple[str, str], Run], pool: Sequence[Run],
                  agg: Sequence[AggRow]) -> list[str]:
    """The goals of this benchmark, each with the figures below that decide it."""
    rows: list[tuple[str, str]] = []

    def ok(value: float, limit: float) -> str:
        shown = f"{value:.3f}" if round(value, 2) == limit else f"{value:.2f}"  # 1.053 is not 1.05
        return f"{shown}x ({'met' if value <= limit else 'NOT met'})"

    over = [(m, fed.steady / floor.steady) for (m, runner), fed in cache.items() if runner == "fedbip"
            and (floor := cache.get((m, "floor"))) and not fed.error and not floor.error]
    if over:
        rows.append(("steady rounds at most 1.05x the compute floor",
                     "; ".join(f"{m} {ok(x, 1.05)}" for m, x in over)))
    flower = [(m, runner, fed, fl) for (m, runner), fl in cache.items() if runner.startswith("flower-")
              and (fed := cache.get((m, "fedbip"))) and not fed.error and not fl.error]
    for label, key, limit in (("steady rounds no slower than Flower's", "steady", 1.0),
                              ("whole run at most 0.9x Flower's", "whole", 0.9),
                              ("peak memory at most 0.7x Flower's", "peak_pss", 0.7)):
        if flower:
            rows.append((label, "; ".join(
                f"{m} vs {runner[len('flower-'):]} {ok(getattr(fed, key) / getattr(fl, key), limit)}"
                for m, runner, fed, fl in flower)))
    small = [(runner, fed, fl) for m, runner, fed, fl in flower if m == "smollm2"]
    if small:
        rows.append(("SmolLM2 steady round at most 0.5x Flower's", "; ".join(
            f"vs {runner[len('flower-'):]} {ok(fed.steady / fl.steady, 0.5)}" for runner, fed, fl in small)))
    good = [r for r in pool if not r.error]
    if len(good) >= 2:
        lo, hi = good[0], good[-1]
        grow = hi.peak_pss / lo.peak_pss
        train = [float(np.mean(r.rounds[1:-1])) for r in good if len(r.rounds) > 2]
        rows.append(("pool mode: peak memory flat in N (at most 1.25x from the smallest to the largest N)",
                     f"N={lo.extra['num_clients']} -> {hi.extra['num_clients']}: {_gb(lo.peak_pss)} -> "
                     f"{_gb(hi.peak_pss)} GiB, {ok(grow, 1.25)}"))
        if train:
            rows.append(("pool mode: round time linear in participating clients",
                         f"{good[0].extra.get('per_round')} clients per round at every N: steady train round "
                         f"{min(train):.2f}-{max(train):.2f} s from N={lo.extra['num_clients']} to "
                         f"{hi.extra['num_clients']} (the last round evaluates all N clients: see section 3)"))
    for strategy in dict.fromkeys(r.strategy for r in agg):
        done = [r for r in agg if r.strategy == strategy and r.traced_peak]
        biggest = max(done, key=lambda r: r.matrix, default=None)
        if biggest is None:
            continue
        ratios = [r.traced_peak / r.matrix for r in done]  # type: ignore[operator]
        flat = max(ratios) <= 1.15 * min(ratios)
        skipped = [f"N={r.n}, D={r.d:g} skipped ({r.skipped.partition(': ')[2] or r.skipped})" for r in agg
                   if r.strategy == strategy and r.skipped]
        rows.append((f"aggregation ({strategy}) without N^2 copies, up to N = 1000, D = 1e6",
                     f"{'met' if flat else 'NOT met'}: allocations {min(ratios):.2f}-{max(ratios):.2f} x M; "
                     f"largest N={biggest.n}, D={biggest.d:g}: {_f(biggest.seconds)} s, all processes "
                     f"{_gb(biggest.total_pss_peak)} GiB" + (f"; {'; '.join(skipped)}" if skipped else "")))
    ratios = []
    for r in [*(r for (_, runner), r in cache.items() if runner == "fedbip"), *pool]:
        if not r.error and r.extra.get("metrics") and r.extra.get("dim"):
            _, b_in, b_out, minimum = bytes_per_round(r)
            ratios.append((b_in + b_out) / minimum)
    if ratios:
        worst = max(ratios)
        rows.append(("bytes per round close to 2 x k x D x 4 (at most 1.05x)",
                     f"{ok(worst, 1.05)} at worst over {len(ratios)} runs"))
    rows.append(("GPU throughput", "not measured: " + ("the runs used CPU settings" if cuda_device()
                                                         else "no GPU on this machine")))
    out = ["## Goals", "", "| goal | result |", "|---|---|"]
    out += [f"| {goal} | {result} |" for goal, result in rows]
    out.append("")
    return out


def bytes_section(runs: Sequence[Run]) -> list[str]:
    out = ["## 5. Bytes moved per round", "",
           "From `metrics.jsonl`: `bytes_in` = task-vector bytes the server received, `bytes_out` = "
           "state bytes sent to the round's participants. Minimum = 2 x participating clients x D x 4 "
           "(each participant receives its state and returns its task vector, float32). D is read from "
           "the checkpoint's `states` tensor. Evaluation additionally sends every evaluated client's "
           "state (N_eval x D x 4, not in `bytes_out`); shown separately.", "",
           "| run | D | participating clients | bytes_in per round | bytes_out per round | in + out "
           "| minimum 2 x k x D x 4 | (in + out) / minimum | evaluation states per evaluated round |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        if r.error or not r.extra.get("metrics"):
            continue
        rows = r.extra["metrics"]
        dim = r.extra.get("dim")
        k, b_in, b_out, minimum = bytes_per_round(r)
        n_eval = [len(x.get("per_client_accuracy") or {}) for x in rows]
        evals = max(n_eval) * dim * 4 if dim and n_eval else None
        out.append(f"| {r.runner} {r.workload} | {dim} | {k:g} | {_bytes(b_in)} | {_bytes(b_out)} "
                   f"| {_bytes(b_in + b_out)} | {_bytes(minimum)} | {_ratio(b_in + b_out, minimum)} | {_bytes(evals)} |")
    out.append("")
    return out


def _bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def cuda_device() -> str | None:
    """The name of the GPU torch sees in this process (None: none)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - informational
        return None


def gpu_line() -> str:
    """Whether a GPU was visible to this process and to nvidia-smi."""
    name = cuda_device()
    smi = shutil.which("nvidia-smi")
    if name:
        return f"GPU: {name} visible to torch; the runs above used CPU settings (num_gpus_per_client=0)."
    return ("GPU: none. `torch.cuda.is_available()` is False"
            f"{'' if smi else ' and there is no nvidia-smi'} on this machine, so every figure is CPU-only; "
            "no GPU machine was available to this benchmark. The GPU paths (actors with "
            "`num_gpus_per_client`, bf16 weights on CUDA) are not measured here.")


def machine_line() -> str:
    import psutil

    versions = []
    for mod in ("torch", "ray", "transformers", "peft"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001
            continue
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.1f} GiB RAM, "
            f"Python {platform.python_version()}, " + ", ".join(versions))


def explanations(cache: dict[tuple[str, str], Run]) -> list[str]:
    """Why the figures differ, with the measured numbers where there are some."""
    out = ["## Why the numbers differ", "",
           "- **Persistent actors vs per-message clients.** fedbip starts one client actor per CPU "
           "(`num_cpus_per_client=1`), each builds the model once and keeps it for the whole run; a "
           "message only carries the client's adapter state (D floats) and the actor loads it into the "
           "resident model (`load_state`, a copy of D values). Flower's simulation engine keeps its Ray "
           "actors too, but calls the ClientApp afresh for every message; an app written like Flower's "
           "templates builds the model inside that call, so the model is built once per train and once "
           "per evaluate message (2 x clients per round). What that costs depends on the model's build "
           "time (measured below): small for MiniLM, large for SmolLM2-135M (0.5 GB of fp32 weights).",
           "- **Start-up.** Both start a local Ray (fedbip 2.60, Flower 2.55). fedbip's start-up also "
           "builds the shards and loads the model once per actor before round 1; Flower's ServerApp "
           "builds the model once more to obtain the initial arrays.",
           "- **Memory.** Both resident footprints have the same shape: a driver, one model per "
           "client worker, Ray's own processes (GCS, raylet with the object store, dashboard agent, "
           "runtime-env agent, monitor). fedbip adds a server actor (numpy only) that holds the N x D "
           "states; Flower's driver (ServerApp) built one more model for the initial arrays and keeps "
           "torch/transformers loaded. The largest processes at each run's peak are listed under its "
           "table. In flower-reload a worker builds a new model for every message; whatever the allocator "
           "does not hand back to the OS after the previous one is freed shows up in its PSS.",
           "- **Per round.** fedbip's round adds, on top of the floor: 2 x N Ray calls (fit, evaluate) "
           "and one aggregation call, states and task vectors through the shared-memory object store, "
           "a metrics.jsonl line and an atomic checkpoint of the N x D states. Flower's round adds its "
           "message routing through the in-process LinkState: the ServerApp's `InMemoryGrid` pushes the "
           "messages and polls for replies, the simulation engine's worker loop pulls them and submits "
           "each to a Ray actor, which calls the ClientApp.",
           "- **Scheduling.** fedbip keeps one call in flight per client actor and runs each actor's "
           "clients longest first by what the client's last call of the phase took; an actor with "
           "nothing left takes the cheapest client queued for the actor with the most work left "
           "(`fedbip_ray/runtime/scheduling.py`). With clients of unequal cost (SmolLM2: tasks with "
           "longer answers take longer to generate), a phase then ends with short calls on both "
           "actors instead of one long call while the other actor idles. Flower's simulation engine "
           "hands each message to the next free actor in the order its ServerApp sent them. The floor "
           "dispatches as fedbip does, so section 1 measures orchestration, not scheduling.",
           "- **Round 1.** fedbip's actors import torch/transformers and build the model before round 1 "
           "(start-up); Flower's workers do their first imports inside round 1, so compare steady rounds "
           "(rounds >= 2) and whole runs.",
           ""]
    for (model, runner), rel in cache.items():
        fed = cache.get((model, "fedbip"))
        if runner not in ("flower-reload", "flower-reload-gguf") or rel.error or fed is None or fed.error:
            continue
        loads, secs = rel.extra.get("loads") or [], rel.extra.get("load_seconds") or []
        if len(loads) > 1 and sum(loads[1:]):
            per = sum(secs[1:]) / sum(loads[1:])
            line = (f"- Measured on {model}: {runner} built the model "
                    f"{sum(loads[1:]) / (len(loads) - 1):.0f} times per steady round, {per:.2f} s per build "
                    f"({sum(secs[1:]) / (len(secs) - 1):.1f} s per round, summed over its workers); its "
                    f"steady round was {rel.steady - fed.steady:+.2f} s longer than fedbip's.")
            cac = cache.get((model, "flower-cached"))
            comp_r = rel.extra.get("compute_seconds") or []
            comp_c = (cac.extra.get("compute_seconds") or []) if cac and not cac.error else []
            if len(comp_r) > 1 and len(comp_c) > 1:
                line += (f" Training + evaluation inside the ClientApp (summed over workers, steady rounds): "
                         f"{np.mean(comp_r[1:]):.1f} s per round with a fresh model per message vs "
                         f"{np.mean(comp_c[1:]):.1f} s with a kept one.")
            out.append(line)
    for (model, runner), fl in cache.items():
        fed = cache.get((model, "fedbip"))
        if runner != "flower-cached" or fl.error or fed is None or fed.error:
            continue
        held = re.search(r"ray::ClientActor(?: x\d+)? (\d+)", fed.extra.get("peak_top") or "")
        if held:
            clients = int(held.group(1)) * MIB
            budget = 0.7 * fl.peak_pss
            out.append(f"- Memory on {model}: at fedbip's peak its client actors alone held "
                       f"{_gb(clients)} GiB ({clients / fl.peak_pss:.2f}x of flower-cached's whole peak, "
                       f"{_gb(fl.peak_pss)} GiB): the model and its training and evaluation working set, "
                       "the same trainer code in both. 0.7x of Flower's peak is "
                       f"{_gb(budget)} GiB, which leaves {_gb(max(0.0, budget - clients))} GiB for "
                       "everything that is not a client actor (the driver, the server actor and Ray's "
                       f"processes: {_gb(fed.peak_pss - clients)} GiB in fedbip's run).")
    out.append("")
    return out


# ---------------------------------------------------------------------------------- main
def _csv_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _cases(text: str) -> list[tuple[int, int]]:
    """``"125x1e6,1000x2.5e5"`` -> [(125, 1000000), (1000, 250000)]."""
    out = []
    for item in _csv(text):
        n, _, d = item.lower().partition("x")
        out.append((int(float(n)), int(float(d))))
    return out


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run: minutes, not timings)")
    p.add_argument("--sections", type=_csv, default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help=f"markdown report (default {DEFAULT_OUT}; none with --quick)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the machine (floor workers)")
    p.add_argument("--inprocess", action="store_true",
                   help="run fedbip federations inside this process (joins an initialized Ray; CI); "
                        "whole-run times are then not measured")
    p.add_argument("--rounds", type=int, default=None, help="override the rounds of the overhead/Flower presets")
    p.add_argument("--overhead-models", type=_csv, default=None, help="default tiny-bert,minilm (quick: tiny-bert)")
    p.add_argument("--flower-models", type=_csv, default=None, help="default minilm,smollm2 (quick: tiny-bert,tiny-llama)")
    p.add_argument("--flower-variants", type=_csv, default=["reload", "cached", "reload-gguf"],
                   help="reload,cached,reload-gguf (reload-gguf: SmolLM2 only)")
    p.add_argument("--flower-python", default=DEFAULT_FLOWER_PYTHON, help="python of the Flower venv")
    p.add_argument("--pool-n", type=_csv_ints, default=None, help="clients per pool run (default 8,32,128,512; quick 8,32)")
    p.add_argument("--pool-per-round", type=int, default=8, help="clients per round in pool mode")
    p.add_argument("--pool-rounds", type=int, default=None, help="rounds per pool run (default 5; quick 3)")
    p.add_argument("--pool-actors", type=int, default=2, help="client actors in pool mode")
    p.add_argument("--agg-cases", type=_cases, default=None,
                   help="NxD cases for aggregation (default 125x1e6,250x1e6,500x1e6,1000x2.5e5,1000x1e6; "
                        "quick 8x2e4,32x2e4)")
    p.add_argument("--agg-strategies", type=_csv, default=["fedbip", "fedavg"],
                   help="strategies of the server actor (default fedbip,fedavg)")
    p.add_argument("--agg-force", action="store_true", help="run sizes predicted not to fit in memory")
    p.add_argument("--reuse", type=Path, default=None,
                   help="a --json file of an earlier run: the sections not selected by --sections are "
                        "reported from it instead of run again (the report names them)")
    p.add_argument("--retries", type=int, default=1,
                   help="re-run a run that failed before its first round (default 1)")
    p.add_argument("--run-fedbip", help=argparse.SUPPRESS)
    p.add_argument("--run-floor", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    q = args.quick
    args.overhead_models = args.overhead_models or (["tiny-bert"] if q else ["tiny-bert", "minilm"])
    args.flower_models = args.flower_models or (["tiny-bert", "tiny-llama"] if q else ["minilm", "smollm2"])
    args.pool_n = args.pool_n or ([8, 32] if q else [8, 32, 128, 512])
    args.pool_rounds = args.pool_rounds or (3 if q else 5)
    args.agg_cases = args.agg_cases or _cases(
        "8x2e4,32x2e4" if q else "125x1e6,250x1e6,500x1e6,1000x2.5e5,1000x1e6")
    return args


def load_reused(path: Path, args: argparse.Namespace) -> tuple[dict[tuple[str, str], Run], list[Run],
                                                                list[AggRow], dict[str, str]]:
    """The sections of an earlier ``--json`` file that this run does not select (whole sections,
    so that every table comes from one run): (comparison runs by (model, runner), pool runs,
    aggregation rows, {reused section: the command of the run that measured it}). The overhead and
    Flower sections share their fedbip runs, so they are reused together or not at all."""
    raw = json.loads(Path(path).read_text())
    runs = [Run(**{k: v for k, v in d.items() if k not in ("steady", "startup")})
            for d in raw.get("runs", [])]
    secs = set(args.sections)
    cache: dict[tuple[str, str], Run] = {}
    pool: list[Run] = []
    agg: list[AggRow] = []
    names: list[str] = []
    if not secs & {"overhead", "flower"}:
        cache = {(r.workload, r.runner): r for r in runs if not r.workload.startswith("pool-")}
        names += ["overhead", "flower"]
    if "pool" not in secs:
        pool = [r for r in runs if r.workload.startswith("pool-")]
        names += ["pool"] if pool else []
    if "aggregation" not in secs:
        agg = [AggRow(**d) for d in raw.get("aggregation", [])]
        names += ["aggregation"] if agg else []
    sources = raw.get("sources") or {}
    command = str(raw.get("command", "not recorded"))
    return cache, pool, agg, {n: str(sources.get(n, command)) for n in names}


def flower_runners(model: str, variants: Sequence[str]) -> list[str]:
    """The Flower runners of ``model``: ``reload-gguf`` exists for the GGUF-packaged SmolLM2 only."""
    return [f"flower-{v}" for v in variants if v != "reload-gguf" or model == "smollm2"]


def _command(argv: Sequence[str] | None) -> str:
    given = list(argv) if argv is not None else sys.argv[1:]
    return "python benchmarks/performance.py" + "".join(f" {a}" for a in given)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections; print the report and write it to ``--out``. Returns 0."""
    args = parse_args(argv)
    if args.run_fedbip:
        return fedbip_child(args.run_fedbip)
    if args.run_floor:
        return floor_child(args.run_floor)
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    out_path = args.out if args.out is not None or args.quick else DEFAULT_OUT
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedbip-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    secs = set(args.sections)
    cache: dict[tuple[str, str], Run] = {}
    pool: list[Run] = []
    agg: list[AggRow] = []
    reused: dict[str, str] = {}
    if args.reuse is not None:
        try:
            cache, pool, agg, reused = load_reused(args.reuse, args)
        except (OSError, ValueError, TypeError) as exc:
            print(f"--reuse {args.reuse}: not a readable --json file of this benchmark "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
            return 2
    shown = secs | set(reused)
    try:
        if "overhead" in secs:
            comparison_runs(args.overhead_models, lambda m: ["floor", "fedbip"], args, work, cache)
        if "flower" in secs:
            comparison_runs(args.flower_models,
                            lambda m: ["fedbip", *flower_runners(m, args.flower_variants)],
                            args, work, cache)
        if "pool" in secs:
            pool = pool_runs(args, work)
        if "aggregation" in secs:
            agg = aggregation_rows(args.agg_cases, args.agg_strategies, args.agg_force)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    lines = ["# Performance and scale", "",
             f"Command: `{_command(argv)}`", "",
             f"Machine: {machine_line()}", "",
             gpu_line(), "",
             (f"Benchmark wall time: {time.perf_counter() - t_start:.0f} s. " if secs - {"bytes"} else
              "Every section below is reused (nothing was run by this command). ") +
             "Peak memory = PSS summed over the "
             "measured process and all its descendants (Ray's GCS, raylet, object store and workers "
             "included), sampled every 0.25 s by one psutil sampler (`TreeMemorySampler`) for every runner. "
             "A round ends when its evaluation (and, for fedbip, its checkpoint) is done; round r's time is "
             "the time since round r-1 ended (round 1: since the clients were ready).", ""]
    if reused:
        lines += [f"Sections reused from `{args.reuse}`, not run again (each section's tables come "
                  "from one run; the command of that run):", "",
                  *[f"- {name}: `{cmd}`" for name, cmd in reused.items()], ""]
    lines += goals_section(cache, pool, agg)
    if args.inprocess:
        lines += ["fedbip runs were in-process (`--inprocess`): whole-run times are not measured and "
                  "peak memory includes the benchmark process.", ""]
    if "overhead" in shown:
        lines += overhead_section(cache, args.overhead_models)
    if "flower" in shown:
        lines += flower_section(cache, args.flower_models, args.flower_variants)
    if "pool" in shown:
        lines += pool_section(pool)
    if "aggregation" in shown:
        lines += aggregation_section(agg)
    if "bytes" in shown:
        fed_runs = [r for (_, runner), r in cache.items() if runner == "fedbip"] + pool
        lines += bytes_section(fed_runs)
    lines += ["## 6. GPU", "", gpu_line(), ""]
    if "flower" in shown:
        lines += explanations(cache)
    report = "\n".join(lines)
    print(report)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(report)
        _log(f"wrote {out_path}")
    if args.json is not None:
        raw = {"command": _command(argv),
               "sources": {**{n: _command(argv) for n in ("overhead", "flower", "pool", "aggregation")
                              if n in secs}, **reused},
               "runs": [dataclasses.asdict(r) | {"steady": r.steady, "startup": r.startup}
                        for r in [*cache.values(), *pool]],
               "aggregation": [dataclasses.asdict(r) for r in agg]}
        _write_json(args.json, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
