"""Shared fixtures: a real local Ray (one per session), offline settings, small configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parent.parent


def fedbip_cli(argv: list[str], env: dict[str, str], cwd: Path,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed ``fedbip`` command in a fresh process (no Ray of this test session), with
    this process's environment minus ``RAY_ADDRESS``, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(env)
    return subprocess.run([str(REPO / ".venv" / "bin" / "fedbip"), *argv], capture_output=True,
                          text=True, env=full, timeout=timeout, cwd=cwd)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything in its session
    (an embedded Ray included), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def tiny_config(**sections) -> dict:
    """A small federation on the tiny random-init BERT and the synthetic text dataset."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "model": {"name": "tiny-bert", "max_length": 24,
                  "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"dataset": "synthetic-text", "num_clients": 4, "examples_per_client": 60,
                 "partition": {"kind": "groups", "num_groups": 2}},
        "train": {"local_epochs": 3, "batch_size": 16, "lr": 0.02},
        "strategy": {"name": "fedbip"},
        "federation": {"rounds": 2},
        "resources": {"num_cpus_per_client": 1},
        "tracking": {"mlflow": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


MAX_NORM = 50.0  # clean tiny task vectors have norm ~3.5


def clean_config(**sections) -> dict:
    """The tiny 3-round run with ``max_norm`` set that fault and kill-and-resume tests compare
    against."""
    return tiny_config(federation={"rounds": 3, "updates": {"max_norm": MAX_NORM}}, **sections)


def clean_run(tmp_path_factory) -> tuple[dict, Path]:
    """:func:`clean_config` run once per session without interruption, on the session's Ray
    (``ray_local``; the same results as ``fedbip run``): (summary, output dir)."""
    from fedbip_ray.config import config_from_dict
    from fedbip_ray.runtime.federation import run_federation

    out = tmp_path_factory.getbasetemp() / "clean_tiny_run"
    if not (out / "summary.json").is_file():
        run_federation(config_from_dict(clean_config()), out, echo=lambda s: None)
    return json.loads((out / "summary.json").read_text()), out


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime with 2 CPUs, shared by the integration tests, whose runs reuse
    warm client actors (:func:`fedbip_ray.reuse_actors`)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp,
             logging_level="ERROR", log_to_driver=False)
    from fedbip_ray.api import reuse_actors

    with reuse_actors():  # runs of the same shape share warm client actors
        yield ray
    ray.shutdown()
