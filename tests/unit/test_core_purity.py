"""fedbip_ray.core imports no ray, mlflow, transformers, peft or torch; the driver no torch."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import fedbip_ray.core, sys; "
    "bad=[m for m in ('ray','mlflow','transformers','peft','torch') if m in sys.modules]; "
    "assert not bad, bad"
)


def test_core_imports_no_heavy_frameworks() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


DRIVER = (
    "import fedbip_ray.cli, fedbip_ray.runtime.federation, fedbip_ray.tracking.mlflow_logger, sys; "
    "bad=[m for m in ('torch','transformers','peft') if m in sys.modules]; "
    "assert not bad, bad"
)


def test_driver_side_imports_no_torch() -> None:
    """The driver starts actors and moves refs: torch and transformers load in the actors
    only (a driver with torch costs ~250 MB more on every run)."""
    proc = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


PREFLIGHT = (
    "import sys, tempfile; from pathlib import Path; "
    "from fedbip_ray.config import config_from_dict; "
    "from fedbip_ray.runtime.federation import preflight_model; "
    "from fedbip_ray.data.shards import build_shards; "
    "from fedbip_ray.models.names import minilm_path; "
    "cfg = config_from_dict({'model': {'name': 'minilm'}, 'data': {'dataset': 'synthetic-text', "
    "'num_clients': 3, 'examples_per_client': 20}}); "
    "preflight_model(cfg.model); "
    "preflight_model(cfg.model.model_copy(update={'name': str(minilm_path())})); "
    "cfg.strategy.build(); build_shards(cfg.data, 0, Path(tempfile.mkdtemp()) / 'shards'); "
    "bad=[m for m in ('torch','transformers','peft') if m in sys.modules]; "
    "assert not bad, bad"
)


def test_driver_side_run_preparation_loads_no_torch() -> None:
    """What the driver does before it starts actors (model preflight of an alias and of a
    model directory, strategy, shards) runs without torch too."""
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
