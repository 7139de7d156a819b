"""Load a client's personalized adapter logged by a run, as a standard peft model.

``MlflowCallback`` logs every client's adapter in peft format under ``adapters/client_XXXX/``
of the MLflow run. :func:`load_client_adapter` rebuilds the base model with
:mod:`fedbip_ray.models.factory` (same config, same seed) and loads the adapter with
``PeftModel.from_pretrained``; :func:`evaluate_classifier` scores it on a split with the
trainers' own evaluation loop.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.training.loops import classification_eval
from fedbip_ray.training.sequence import encode_texts, text_batches

ADAPTER_FILE = "adapter_config.json"
_HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def adapter_artifact_path(client_id: int) -> str:
    """Artifact path of a client's adapter inside an MLflow run."""
    return f"adapters/client_{int(client_id):04d}"


def find_adapter_dir(root: str | Path, client_id: int) -> Path | None:
    """The adapter directory for ``client_id`` under a local ``root``: ``root`` itself (if it is
    an adapter), ``root/client_XXXX`` or ``root/adapters/client_XXXX``; None if absent."""
    base = Path(root)
    for cand in (base, base / f"client_{client_id:04d}", base / adapter_artifact_path(client_id)):
        if (cand / ADAPTER_FILE).is_file():
            return cand
    return None


def num_labels_from_adapter(directory: str | Path) -> int | None:
    """Number of labels from the saved classification head's weight ``(K, hidden)``, if any."""
    from safetensors import safe_open

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="np") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
            if key.endswith(_HEAD_SUFFIXES):
                shape = fh.get_slice(key).get_shape()
                if len(shape) == 2:
                    return int(shape[0])
    return None


def download_adapter(run_id: str, client_id: int, dst: str | Path,
                     tracking_uri: str | None = None) -> Path:
    """Download ``adapters/client_XXXX`` of MLflow run ``run_id`` into ``dst``; its directory."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=adapter_artifact_path(client_id), dst_path=str(dst),
            tracking_uri=tracking_uri)
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"run {run_id}: no adapter for client {client_id} "
                          f"({str(exc).splitlines()[0][:200]})") from None
    found = find_adapter_dir(local, client_id)
    if found is None:
        raise ConfigError(f"run {run_id}: artifact {adapter_artifact_path(client_id)} holds no "
                          f"{ADAPTER_FILE}")
    return found


def _num_labels_of_run(run_id: str, tracking_uri: str | None) -> int | None:
    """Number of labels from the run's ``data/clients.json`` artifact (None if absent)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="data/clients.json", dst_path=tmp,
                tracking_uri=tracking_uri)
            return len(json.loads(Path(local).read_text())["label_names"])
        except (MlflowException, OSError, ValueError, KeyError):
            return None


def load_client_adapter(source: str | Path, client_id: int, cfg: Config,
                        num_labels: int | None = None,
                        tracking_uri: str | None = None) -> torch.nn.Module:
    """The base model of ``cfg`` with client ``client_id``'s logged adapter, in eval mode.

    Args:
        source: an MLflow run id, or a local directory (an adapter directory, a downloaded
            ``adapters/`` directory, or a directory holding ``adapters/client_XXXX``).
        client_id: the client whose personalized adapter to load.
        cfg: the run's config (model, peft and seed must match the run's).
        num_labels: number of classes; by default read from the run's ``data/clients.json``
            or from the adapter's head weight.
        tracking_uri: MLflow tracking URI for a run id (default: ``cfg``'s, then the env's).

    Returns:
        A ``peft.PeftModel`` (sequence classification) on CPU.
    """
    local = find_adapter_dir(source, client_id) if Path(str(source)).is_dir() else None
    if local is not None:
        return _load_from_dir(local, cfg, num_labels)
    if Path(str(source)).exists():
        raise ConfigError(f"{source}: no adapter for client {client_id} found there")
    from fedbip_ray.tracking.mlflow_logger import tracking_uri as default_uri

    uri = tracking_uri or default_uri(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        directory = download_adapter(str(source), client_id, tmp, uri)
        if num_labels is None:
            num_labels = _num_labels_of_run(str(source), uri)
        return _load_from_dir(directory, cfg, num_labels)


def _load_from_dir(directory: Path, cfg: Config, num_labels: int | None) -> torch.nn.Module:
    from peft import PeftModel

    from fedbip_ray.models.factory import load_base_model, load_tokenizer

    if cfg.model.task != "sequence-classification":
        raise ConfigError(f"model.task '{cfg.model.task}': load_client_adapter supports "
                          "sequence-classification adapters")
    labels = num_labels or num_labels_from_adapter(directory)
    if labels is None:
        raise ConfigError(f"{directory}: cannot tell the number of labels; pass num_labels")
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, labels, len(tokenizer), cfg.seed)
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    return model.eval()


def evaluate_classifier(model: torch.nn.Module, tokenizer: Any, frame: pd.DataFrame,
                        max_length: int, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``frame`` (columns ``text``, ``label``),
    tokenized, batched and scored as the client trainer does (padded to the split's longest
    example, each batch cut to its own longest)."""
    data = encode_texts(tokenizer, frame, max_length)
    device = next(model.parameters()).device
    batches = text_batches(data, batch_size, None, device)
    return dict(classification_eval(model, batches, lambda inputs: model(**inputs).logits,
                                    len(data)))
