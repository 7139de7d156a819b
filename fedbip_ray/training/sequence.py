"""Sequence classification (``model.task: sequence-classification``): text -> label."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config
from fedbip_ray.models.factory import build_model
from fedbip_ray.models.shared_base import FrozenBase
from fedbip_ray.training.base import AdapterTrainer, setup_torch
from fedbip_ray.training.loops import classification_eval, ordered_indices
from fedbip_ray.training.protocol import EvalMetrics, FitMetrics

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Encoded:
    """A tokenized split: input_ids/attention_mask (n, L) int64, labels (n,) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode_texts(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> Encoded:
    """Tokenize a split (columns ``text``, ``label``) once, padded to its longest example
    (at most ``max_length`` tokens)."""
    if len(frame) == 0:
        z = torch.zeros((0, 1), dtype=torch.long)
        return Encoded(z, z, torch.zeros(0, dtype=torch.long))
    enc = tokenizer(list(frame["text"].astype(str)), truncation=True, max_length=max_length,
                    padding="longest", return_tensors="pt")
    labels = torch.tensor(frame["label"].to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
    return Encoded(enc["input_ids"], enc["attention_mask"], labels)


def text_batches(data: Encoded, batch_size: int, gen: torch.Generator | None,
                 device: torch.device) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """(model inputs, labels (b,)) per batch, each batch cut to its own longest example;
    shuffled by ``gen`` when given."""
    for idx in ordered_indices(len(data), batch_size, gen):
        mask = data.attention_mask[idx]
        width = int(mask.sum(dim=1).max()) if len(idx) else 1
        inputs = {"input_ids": data.input_ids[idx, :width].to(device),
                  "attention_mask": mask[:, :width].to(device)}
        yield inputs, data.labels[idx].to(device)


class SequenceTrainer(AdapterTrainer):
    """A text classifier + adapter (tokenizer in ``tokenizer``); cross-entropy on the label."""

    def __init__(self, cfg: Config, num_labels: int, device: torch.device | None = None,
                 base: FrozenBase | None = None) -> None:
        self.cfg, self.seed = cfg, cfg.seed
        self.device = setup_torch(cfg, device)
        self.precision = self._resolve_precision()
        model, self.tokenizer = build_model(cfg.model, num_labels, cfg.seed,
                                            self._shared_model(base))
        self._adopt(model.to(self.device))

    def encode(self, frame: pd.DataFrame) -> Encoded:
        """Tokenize a split once (padded to its longest example, at most max_length)."""
        return encode_texts(self.tokenizer, frame, self.cfg.model.max_length)

    def logits(self, inputs: Inputs) -> torch.Tensor:
        """(b, K) float32 logits of one batch."""
        with self.autocast():
            out = self.model(**inputs)
        return out.logits.float()

    def train(self, data: Encoded, epochs: int, seed: int, prox_mu: float = 0.0) -> FitMetrics:
        """Train the loaded state in place for ``epochs`` local epochs. Returns metrics."""
        self.model.train()

        def loss_of(batch: tuple[Inputs, torch.Tensor]) -> torch.Tensor:
            inputs, y = batch
            return torch.nn.functional.cross_entropy(self.logits(inputs), y)

        bs = self.cfg.train.batch_size
        return self._run_epochs(epochs, seed, prox_mu,
                                lambda gen: text_batches(data, bs, gen, self.device), loss_of)

    def ala_losses(self, data: Encoded, rows: slice) -> Iterator[torch.Tensor]:
        """The loss of each full batch of ``data[rows]`` in data order (FedALA's weight
        learning, :mod:`fedbip_ray.training.ala`)."""
        from fedbip_ray.training.ala import full_batches

        sub = Encoded(data.input_ids[rows], data.attention_mask[rows], data.labels[rows])
        for part in full_batches(len(sub), self.cfg.train.batch_size):
            chunk = Encoded(sub.input_ids[part], sub.attention_mask[part], sub.labels[part])
            for inputs, y in text_batches(chunk, len(chunk), None, self.device):
                yield torch.nn.functional.cross_entropy(self.logits(inputs), y)

    def evaluate(self, data: Encoded) -> EvalMetrics:
        """Accuracy and mean loss of the loaded state on ``data``."""
        batches = text_batches(data, self.cfg.train.eval_batch_size, None, self.device)
        return classification_eval(self.model, batches, self.logits, len(data))
