"""The compute floor: the same local training and evaluation in plain worker processes, no
framework (``--run-floor JOB`` of ``benchmarks/performance.py``)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf.common import Run, fail_run, log_tail, write_json
from benchmarks.perf.measure import round_times, run_entry, top_processes
from fedbip_ray.runtime.rows import sample_clients


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
    from fedbip_ray.training.registry import make_trainer
    from fedbip_ray.training.seeds import seed_for

    cfg = Config.model_validate(cfg_dict)
    trainer = make_trainer(cfg, num_labels)
    conn.send(("ready", trainer.initial_state(), trainer.layout.to_dict(),
               torch.get_num_threads()))
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
                metrics = trainer.train(d["train"], cfg.train.local_epochs,
                                        seed_for(cfg.seed, cid, rnd), 0.0)
                tau = trainer.current_state() - np.asarray(state, dtype=np.float32)
                out.append((cid, tau.astype(np.float32, copy=False), len(d["train"]), metrics))
            else:
                out.append((cid, {s: trainer.evaluate(d[s]) for s in ("val", "test")}))
        conn.send(out)
    conn.close()


class WorkerPool:
    """``workers`` spawned :func:`floor_worker` processes. ``ready[w]`` is worker w's first
    message: ("ready", initial state (D,) float32, layout dict, torch threads)."""

    def __init__(self, cfg: dict[str, Any], shards: dict[int, str], num_labels: int,
                 workers: int, threads: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=floor_worker,
                               args=(child, cfg, num_labels, shards, threads))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.ready = [c.recv() for c in self.conns]
        self.seconds: dict[str, dict[int, float]] = {"fit": {}, "eval": {}}

    def scatter(self, kind: str, items: list[tuple[int, np.ndarray, int]]) -> list[Any]:
        """One item in flight per worker, dispatched as fedbip's dispatch does: a free worker
        takes its own next client (c mod W) longest first by the client's last call of this
        kind, else the cheapest one queued for the worker with the most work left."""
        from multiprocessing.connection import wait

        from fedbip_ray.runtime.scheduling import home_queues, take_next

        by_client = {it[0]: it for it in items}
        cost = self.seconds[kind]
        queues = home_queues(list(by_client), len(self.conns), cost=cost)
        out: list[Any] = []
        busy: dict[Any, tuple[int, int, float]] = {}

        def feed(w: int) -> None:
            c = take_next(queues, w, cost)
            if c is not None:
                busy[self.conns[w]] = (w, c, time.monotonic())
                self.conns[w].send((kind, [by_client[c]]))

        for w in range(len(self.conns)):
            feed(w)
        while busy:
            for conn in wait(list(busy)):
                out.extend(conn.recv())
                w, c, t = busy.pop(conn)
                cost[c] = time.monotonic() - t
                feed(w)
        return out

    def close(self) -> None:
        """Stop every worker and wait for it."""
        for conn in self.conns:
            conn.send(("stop", []))
        for proc in self.procs:
            proc.join()


def run_rounds(cfg: dict[str, Any], pool: WorkerPool) -> dict[str, Any]:
    """The rounds of a federation on ``pool``: sample, fit, aggregate in this process, evaluate.
    Returns the clock (start, round ends), the last accuracy, D and each round's phase split."""
    from fedbip_ray.core.strategies import AggregationInput, make_strategy
    from fedbip_ray.core.taskvector import Layout

    n, seed = int(cfg["data"]["num_clients"]), int(cfg["seed"])
    fed = cfg["federation"]
    rounds, eval_every = int(fed["rounds"]), int(fed.get("eval_every", 1))
    k = int(fed.get("clients_per_round")
            or max(1, math.ceil(float(fed.get("fraction", 1.0)) * n)))
    init = np.asarray(pool.ready[0][1], dtype=np.float32)
    layout = Layout.from_dict(pool.ready[0][2])
    states = np.tile(init, (n, 1))
    strategy = make_strategy(cfg["strategy"]["name"], cfg["strategy"].get("params", {}))
    start, ends, accuracy, phases = time.perf_counter(), [], None, []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        part = sample_clients(n, k, seed, rnd)
        fits = sorted(pool.scatter("fit", [(c, states[c], rnd) for c in part]),
                      key=lambda r: r[0])
        t1 = time.perf_counter()
        idx = np.asarray([r[0] for r in fits], dtype=np.int64)
        inp = AggregationInput(states=states[idx], deltas=np.stack([r[1] for r in fits]),
                               counts=np.asarray([r[2] for r in fits], dtype=np.int64),
                               layout=layout, init=init)
        states[idx] = strategy.aggregate(inp).states
        t2 = time.perf_counter()
        if rnd % eval_every == 0 or rnd == rounds:
            evals = pool.scatter("eval", [(c, states[c], rnd) for c in range(n)])
            accs = [e[1]["test"]["accuracy"] for e in evals]
            accuracy = float(np.nanmean(accs)) if accs else None
        ends.append(time.perf_counter())
        phases.append({"fit": t1 - t0, "aggregate": t2 - t1, "evaluate": ends[-1] - t2})
    return {"start": start, "ends": ends, "accuracy": accuracy, "dim": int(layout.size),
            "phases": phases}


def floor_child(job_path: str) -> int:
    """``--run-floor JOB``: the compute floor of a FedAvg federation; writes ``job["result"]``."""
    job = json.loads(Path(job_path).read_text())
    cfg = job["config"]
    workers, threads = plan_workers(cfg, int(job["cpus"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what Ray sets for a num_cpus=threads actor
    shards = {c: job["shards"][c] for c in range(int(cfg["data"]["num_clients"]))}
    pool = WorkerPool(cfg, shards, int(job["num_labels"]), workers, threads)
    res = run_rounds(cfg, pool)
    pool.close()
    write_json(Path(job["result"]), {
        "start": res["start"], "ends": res["ends"], "accuracy": res["accuracy"],
        "dim": res["dim"], "workers": workers, "phases": res["phases"],
        "torch_threads": [r[3] for r in pool.ready]})
    return 0


def floor_run(workload: str, cfg_dict: dict[str, Any], shards: list[str], num_labels: int,
              work: Path, cpus: int) -> Run:
    """Run the floor of one workload in a measured child and collect its figures."""
    result = work / "floor-result.json"
    job = write_json(work / "floor-job.json",
                     {"config": cfg_dict, "shards": shards, "num_labels": num_labels,
                      "cpus": cpus, "result": str(result)})
    log = work / "floor.log"
    rc, wall, sampler = run_entry("--run-floor", job, log)
    if rc != 0 or not result.is_file():
        return fail_run("floor", workload, f"exit {rc}: {log_tail(log)}", wall)
    res = json.loads(result.read_text())
    return Run("floor", workload, round_times(res["start"], res["ends"]), wall, sampler.peak,
               sampler.peak_procs, res["accuracy"],
               extra={"dim": res["dim"], "workers": res["workers"],
                      "torch_threads": res["torch_threads"], "phases": res["phases"],
                      "peak_top": top_processes(sampler.peak_top)})
