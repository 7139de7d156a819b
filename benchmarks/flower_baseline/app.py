"""Flower 1.42 ServerApp + ClientApp doing the same work as a fedbip-ray FedAvg run.

Runs in the Flower venv (``flwr[simulation]==1.42.0``, which pins ``ray==2.55.1``) with the
repository on ``PYTHONPATH``: the ClientApp trains and evaluates with fedbip's own trainer class
(``fedbip_ray.training.registry.make_trainer``; it imports no Ray) on the Parquet shards fedbip
writes, with the same seeds, so the computation per client is identical and only the framework
differs. Messages carry the adapter state only, one flat (D,) float32 array, as fedbip's do.

The job (a JSON file written by ``benchmarks/performance.py``) names the fedbip config, the
shards, the variant and where to write the results:

* ``variant = "reload"``: the model is built for every message, as Flower's Hugging Face app
  template builds it in ``client_fn`` (Flower calls the ClientApp afresh for every message);
* ``variant = "cached"``: one model per Ray worker process, kept in a module-level cache;
* ``variant = "reload-gguf"`` (SmolLM2 only): like ``reload``, but without fedbip's conversion
  cache: every build dequantizes the packaged GGUF file again, as a ClientApp calling
  ``from_pretrained(dir, gguf_file=...)`` in ``client_fn`` does (each build also writes the
  converted copy once into a fresh temporary directory, which it then loads).

Tokenized client data is cached per worker process in every variant.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

JOB_ENV = "FEDBIP_FLOWER_JOB"

_TRAINER: dict[str, Any] = {}  # "cached" variant: this worker's model
_DATA: dict[int, dict[str, Any]] = {}  # tokenized splits per client, this worker


@lru_cache(maxsize=4)
def load_job(path: str) -> dict[str, Any]:
    """The job file written by ``benchmarks/performance.py``."""
    with open(path) as fh:
        return json.load(fh)


@lru_cache(maxsize=4)
def _config(path: str) -> Any:
    from fedbip_ray.config import Config

    return Config.model_validate(load_job(path)["config"])


@contextmanager
def _empty_conversion_cache() -> Iterator[None]:
    """fedbip's model conversion cache pointed at a fresh empty directory (``reload-gguf``)."""
    with tempfile.TemporaryDirectory(prefix="fedbip-flower-gguf-") as tmp:
        os.environ["FEDBIP_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            del os.environ["FEDBIP_CACHE_DIR"]


def build_trainer(job_path: str) -> tuple[Any, float]:
    """(trainer, seconds spent building it): a new one per call for ``reload``, this process's
    one for ``cached``."""
    from fedbip_ray.training.registry import make_trainer

    job = load_job(job_path)
    if job["variant"] == "cached" and "trainer" in _TRAINER:
        return _TRAINER["trainer"], 0.0
    t0 = time.perf_counter()
    with _empty_conversion_cache() if job["variant"] == "reload-gguf" else nullcontext():
        trainer = make_trainer(_config(job_path), int(job["num_labels"]))
    seconds = time.perf_counter() - t0
    if job["variant"] == "cached":
        _TRAINER["trainer"] = trainer
    return trainer, seconds


def client_data(job_path: str, trainer: Any, cid: int) -> dict[str, Any]:
    """The client's train/val/test splits, tokenized once per worker process."""
    from fedbip_ray.data.shards import read_shard

    if cid not in _DATA:
        with open(load_job(job_path)["shards"][cid], "rb") as fh:
            frames = read_shard(fh.read())
        _DATA[cid] = {s: trainer.encode(f) for s, f in frames.items()}
    return _DATA[cid]


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _received_state(msg: Message) -> np.ndarray:
    return np.asarray(msg.content["arrays"].to_numpy_ndarrays()[0], dtype=np.float32)


# ---------------------------------------------------------------------------------- client
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the received adapter state; replies with the trained state."""
    from fedbip_ray.training.seeds import seed_for

    job_path = str(msg.content["config"]["job"])
    cfg = _config(job_path)
    cid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    trainer, load_s = build_trainer(job_path)
    data = client_data(job_path, trainer, cid)
    t0 = time.perf_counter()
    trainer.load_state(_received_state(msg))
    metrics = trainer.train(data["train"], cfg.train.local_epochs, seed_for(cfg.seed, cid, rnd),
                            0.0)
    state = trainer.current_state()
    compute_s = time.perf_counter() - t0
    loss = float(metrics.get("train_loss", float("nan")))
    reply = RecordDict({
        "arrays": ArrayRecord([state]),
        "metrics": MetricRecord({"num-examples": len(data["train"]), "train_loss": loss,
                                 "load_seconds": load_s, "compute_seconds": compute_s,
                                 "threads": _threads()}),
    })
    return Message(content=reply, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy of the received state on the client's val and test splits."""
    job_path = str(msg.content["config"]["job"])
    cid = int(context.node_config["partition-id"])
    trainer, load_s = build_trainer(job_path)
    data = client_data(job_path, trainer, cid)
    t0 = time.perf_counter()
    trainer.load_state(_received_state(msg))
    val, test = trainer.evaluate(data["val"]), trainer.evaluate(data["test"])
    compute_s = time.perf_counter() - t0
    reply = RecordDict({
        "metrics": MetricRecord({"num-examples": int(test["n"]),
                                 "accuracy": float(test["accuracy"]),
                                 "val_accuracy": float(val["accuracy"]), "client": cid,
                                 "load_seconds": load_s, "compute_seconds": compute_s,
                                 "threads": _threads()}),
    })
    return Message(content=reply, reply_to=msg)


# ---------------------------------------------------------------------------------- server
class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording when each round ends (after its evaluation), the model
    building and compute (train / evaluate) seconds reported by the clients, and the unweighted
    mean test accuracy."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.first_start = float("nan")
        self.ends: list[float] = []
        self.loads: list[int] = []
        self.load_seconds: list[float] = []
        self.compute_seconds: list[float] = []
        self.failures: list[int] = []
        self.threads: set[int] = set()
        self.accuracy: float | None = None

    def _note(self, server_round: int, replies: list[Message]) -> None:
        while len(self.loads) < server_round:
            self.loads.append(0)
            self.load_seconds.append(0.0)
            self.compute_seconds.append(0.0)
            self.failures.append(0)
        for msg in replies:
            if msg.has_error():
                self.failures[server_round - 1] += 1
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            secs = float(metrics.get("load_seconds", 0.0))
            self.loads[server_round - 1] += int(secs > 0)
            self.load_seconds[server_round - 1] += secs
            self.compute_seconds[server_round - 1] += float(metrics.get("compute_seconds", 0.0))
            self.threads.add(int(metrics.get("threads", 0)))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if server_round == 1:
            self.first_start = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        self._note(server_round, replies)
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        self._note(server_round, replies)
        accs = [float(next(iter(m.content.metric_records.values()))["accuracy"])
                for m in replies if not m.has_error()]
        self.accuracy = float(np.nanmean(accs)) if accs else None
        out = super().aggregate_evaluate(server_round, replies)
        self.ends.append(time.perf_counter())
        return out


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Initial adapter state from a model built here (as Flower's templates do), then
    ``rounds`` rounds of FedAvg with evaluation of every client; writes the job's result."""
    import flwr
    import ray

    job_path = os.environ[JOB_ENV]
    job = load_job(job_path)
    n = int(job["num_clients"])
    t0 = time.perf_counter()
    from fedbip_ray.training.registry import make_trainer

    trainer = make_trainer(_config(job_path), int(job["num_labels"]))
    init = trainer.initial_state()
    del trainer
    gc.collect()
    init_seconds = time.perf_counter() - t0
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                           min_evaluate_nodes=n, min_available_nodes=n)
    cfg = ConfigRecord({"job": job_path})
    strategy.start(grid=grid, initial_arrays=ArrayRecord([init]), num_rounds=int(job["rounds"]),
                   train_config=cfg, evaluate_config=ConfigRecord({"job": job_path}))
    result = {"start": strategy.first_start, "ends": strategy.ends, "accuracy": strategy.accuracy,
              "loads": strategy.loads, "load_seconds": strategy.load_seconds,
              "compute_seconds": strategy.compute_seconds,
              "failures": strategy.failures, "server_init_seconds": init_seconds,
              "torch_threads": sorted(strategy.threads), "flwr": flwr.__version__,
              "ray": ray.__version__}
    with open(job["result"], "w") as fh:
        json.dump(result, fh, indent=1)
