"""The federations the benchmark measures (dict form of ``fedbip_ray.config.Config``) and their
shards."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
            {"dataset": "synthetic-text", "num_clients": 8,
             "examples_per_client": 24 if quick else 60, "partition": {"kind": "iid"}},
            {"local_epochs": 1 if quick else 3, "batch_size": 16, "lr": 0.02},
            rounds=2 if quick else 6,
        )
    if model == "minilm":
        return _base(
            "perf-minilm",
            {"name": "minilm", "max_length": 48, "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
            {"dataset": "rotten-tomatoes", "num_clients": 8,
             "examples_per_client": 40 if quick else 150, "partition": {"kind": "iid"}},
            {"local_epochs": 1, "batch_size": 16, "lr": 0.002},
            rounds=2 if quick else 5,
        )
    if model == "smollm2":
        return _base(
            "perf-smollm2",
            {"name": "smollm2", "task": "causal-lm", "max_length": 64,
             "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
            {"dataset": "instruct-tasks", "num_clients": 8,
             "examples_per_client": 12 if quick else 32, "partition": {"kind": "column"}},
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


def prepare_shards(cfg_dict: dict[str, Any], directory: Path) -> tuple[list[str], int, float]:
    """Write the Parquet shards of ``cfg_dict`` with fedbip's own ``build_shards`` (the floor and
    Flower read them). Returns (paths, number of labels, seconds it took)."""
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.data.shards import build_shards

    cfg = config_from_dict(cfg_dict)
    t0 = time.perf_counter()
    shards = build_shards(cfg.data, cfg.seed, directory)
    return [str(p) for p in shards.paths], shards.num_labels, time.perf_counter() - t0


def warm_model_cache(model: str) -> None:
    """Build SmolLM2's one-time safetensors conversion before any timed run (both frameworks
    then load the same converted files)."""
    if model == "smollm2":
        from fedbip_ray.models.smollm2 import smollm2_model_dir

        smollm2_model_dir()


@dataclass
class Workload:
    """A model preset with its shards, shared by the runners that do the same work."""

    model: str
    config: dict[str, Any]
    shards: list[str]
    num_labels: int
    shard_seconds: float
    work: Path
