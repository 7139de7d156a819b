"""Image classification (``model.task: image-classification``): pixels -> label."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config
from fedbip_ray.data.images import frame_pixels, rotate_groups
from fedbip_ray.models.shared_base import FrozenBase
from fedbip_ray.models.vision import (
    PIXEL_MEAN,
    PIXEL_STD,
    build_image_model,
    freeze_batchnorm,
    input_size,
)
from fedbip_ray.training.base import AdapterTrainer, setup_torch
from fedbip_ray.training.loops import classification_eval, ordered_indices
from fedbip_ray.training.protocol import EvalMetrics, FitMetrics


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


def image_batches(data: ImageData, batch_size: int, gen: torch.Generator | None,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels (b, 3, S, S), labels (b,)) per batch (grayscale expanded to 3 channels)."""
    for idx in ordered_indices(len(data), batch_size, gen):
        x = data.pixels[idx].to(device)
        yield x.expand(-1, 3, -1, -1), data.labels[idx].to(device)


class ImageTrainer(AdapterTrainer):
    """An image classifier + adapter; BatchNorm stays frozen while training."""

    def __init__(self, cfg: Config, num_labels: int, device: torch.device | None = None,
                 base: FrozenBase | None = None) -> None:
        self.cfg, self.seed = cfg, cfg.seed
        self.size = input_size(cfg.model.name)
        self.rotation_groups = rotation_groups(cfg)
        self.device = setup_torch(cfg, device)
        self.precision = self._resolve_precision()
        model = build_image_model(cfg.model, num_labels, cfg.seed, self._shared_model(base))
        self._adopt(model.to(self.device))

    def encode(self, frame: pd.DataFrame) -> ImageData:
        """Decode a split once: (n, C, S, S) normalized pixels, rotated by group if configured."""
        return encode_frame(frame, self.size, self.rotation_groups)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(b, K) float32 logits of a (b, 3, S, S) batch."""
        with self.autocast():
            out = self.model(x)
        return out.float()

    def train(self, data: ImageData, epochs: int, seed: int, prox_mu: float = 0.0) -> FitMetrics:
        """Train the loaded state in place for ``epochs`` local epochs (BatchNorm frozen)."""
        self.model.train()
        freeze_batchnorm(self.model)

        def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.logits(x), y)

        bs = self.cfg.train.batch_size
        return self._run_epochs(epochs, seed, prox_mu,
                                lambda gen: image_batches(data, bs, gen, self.device), loss_of)

    def ala_losses(self, data: ImageData, rows: slice) -> Iterator[torch.Tensor]:
        """The loss of each full batch of ``data[rows]`` in data order (FedALA's weight
        learning, :mod:`fedbip_ray.training.ala`; BatchNorm frozen)."""
        from fedbip_ray.training.ala import full_batches

        freeze_batchnorm(self.model)
        sub = ImageData(data.pixels[rows], data.labels[rows])
        for part in full_batches(len(sub), self.cfg.train.batch_size):
            x = sub.pixels[part].to(self.device).expand(-1, 3, -1, -1)
            yield torch.nn.functional.cross_entropy(self.logits(x),
                                                    sub.labels[part].to(self.device))

    def evaluate(self, data: ImageData) -> EvalMetrics:
        """Accuracy and mean loss of the loaded state on ``data``."""
        batches = image_batches(data, self.cfg.train.eval_batch_size, None, self.device)
        return classification_eval(self.model, batches, self.logits, len(data))
