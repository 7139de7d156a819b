"""Local training and evaluation of one client's image-classifier adapter (no Ray here).

Same interface as :class:`fedbip_ray.runtime.trainer.LocalTrainer`; states are flat float32
vectors (D,) in the order of ``layout`` (trainable parameters sorted by name).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.data.images import frame_pixels, rotate_groups
from fedbip_ray.models.factory import get_state, trainable_parameters
from fedbip_ray.models.vision import (
    PIXEL_MEAN,
    PIXEL_STD,
    build_image_model,
    freeze_batchnorm,
    input_size,
)


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


class ImageTrainer:
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

    # -- state <-> parameters -------------------------------------------------------------
    def initial_state(self) -> np.ndarray:
        """The adapter's initial trainable state, flat (D,) float32."""
        arrays = get_state(self.model)
        return np.concatenate([arrays[n].ravel() for n in self.layout.names]).astype(np.float32)

    def current_state(self) -> np.ndarray:
        """The current trainable state, flat (D,) float32."""
        with torch.no_grad():
            flat = torch.cat([p.detach().float().reshape(-1) for p in self.params.values()])
        return flat.cpu().numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def load_state(self, state: np.ndarray) -> None:
        """Copy a flat (D,) state into the trainable parameters."""
        if state.shape != (self.layout.size,):
            raise ValueError(f"state has shape {state.shape}, adapter needs ({self.layout.size},)")
        src = torch.from_numpy(np.array(state, dtype=np.float32, copy=True))
        for name, p in self.params.items():
            p.copy_(src[self.layout.index(name)].view(p.shape).to(device=p.device, dtype=p.dtype))

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
        tc = self.train_cfg
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        params = list(self.params.values())
        anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
        if tc.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.model.train()
        freeze_batchnorm(self.model)
        total, steps, start = 0.0, 0, time.perf_counter()
        limit = tc.max_steps_per_round
        for _ in range(epochs):
            for x, y in self._batches(data, tc.batch_size, gen):
                loss = torch.nn.functional.cross_entropy(self.model(x).float(), y)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + 0.5 * prox_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
                if limit and steps >= limit:
                    break
            if limit and steps >= limit:
                break
        loss_mean = total / steps if steps else math.nan
        if not math.isfinite(loss_mean):
            loss_mean = float("nan")
        return {"train_loss": loss_mean, "steps": steps, "train_seconds": time.perf_counter() - start}

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
