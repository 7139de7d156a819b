"""Local training and evaluation of one client's image-classifier adapter (no Ray here).

Same interface as :class:`fedbip_ray.runtime.trainer.LocalTrainer`; states are flat float32
vectors (D,) in the order of ``layout`` (trainable parameters sorted by name).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.data.images import frame_pixels, rotate_groups
from fedbip_ray.models.factory import trainable_parameters
from fedbip_ray.models.vision import (
    PIXEL_MEAN,
    PIXEL_STD,
    build_image_model,
    freeze_batchnorm,
    input_size,
)
from fedbip_ray.runtime.trainer import AdapterState, run_local_epochs


@dataclass(frozen=True)
class ImageData:
    """An encoded split: pixels (n, C, S, S) float32, normalized, C in {1, 3}; labels (n,) int64."""

    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def rotation_groups(cfg: Config) -> int | None:
    """Number of rotation groups when the config asks for a rotation shift, else None."""
    part = cfg.data.partition
    return part.num_groups if part.kind == "groups" and part.shift == "rotation" else None


def encode_frame(frame: pd.DataFrame, size: int, num_rotation_groups: int | None) -> ImageData:
    """Shard rows -> :class:`ImageData`: decode, resize to ``size``, rotate each row by its
    ``group`` column (g * 360 / G degrees) when ``num_rotation_groups`` is set, normalize."""
    x = frame_pixels(frame, size)
    if num_rotation_groups and len(frame):
        x = rotate_groups(x, frame["group"].to_numpy(), num_rotation_groups)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    labels = torch.tensor(frame["label"].to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
    return ImageData(x.contiguous(), labels)


class ImageTrainer(AdapterState):
    """Holds one image model + adapter; loads any flat adapter state, trains, evaluates."""

    def __init__(self, cfg: Config, num_labels: int) -> None:
        if cfg.model.torch_threads:
            torch.set_num_threads(cfg.model.torch_threads)
        self.cfg, self.train_cfg, self.seed = cfg, cfg.train, cfg.seed
        self.size = input_size(cfg.model.name)
        self.rotation_groups = rotation_groups(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_image_model(cfg.model, num_labels, cfg.seed).to(self.device)
        self.params = trainable_parameters(self.model)
        self.layout = Layout.from_shapes({n: tuple(p.shape) for n, p in self.params.items()})

    # -- data -------------------------------------------------------------------------------
    def encode(self, frame: pd.DataFrame) -> ImageData:
        """Decode a split once: (n, C, S, S) normalized pixels, rotated by group if configured."""
        return encode_frame(frame, self.size, self.rotation_groups)

    def _batches(self, data: ImageData, batch_size: int,
                 gen: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(data)
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = data.pixels[idx].to(self.device)
            yield x.expand(-1, 3, -1, -1), data.labels[idx].to(self.device)

    # -- training ---------------------------------------------------------------------------
    def train(self, data: ImageData, epochs: int, seed: int, prox_mu: float = 0.0) -> dict[str, Any]:
        """Train the loaded state in place for ``epochs`` local epochs (BatchNorm frozen)."""
        self.model.train()
        freeze_batchnorm(self.model)

        def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x).float(), y)

        return run_local_epochs(list(self.params.values()), self.train_cfg, epochs, seed, prox_mu,
                                lambda gen: self._batches(data, self.train_cfg.batch_size, gen), loss_of)

    @torch.no_grad()
    def evaluate(self, data: ImageData) -> dict[str, float]:
        """Accuracy and mean loss of the loaded state on ``data``."""
        self.model.eval()
        if len(data) == 0:
            return {"accuracy": math.nan, "loss": math.nan, "n": 0}
        correct, loss_sum = 0, 0.0
        for x, y in self._batches(data, self.train_cfg.eval_batch_size, None):
            logits = self.model(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        n = len(data)
        return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}
