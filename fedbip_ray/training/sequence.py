"""Sequence classification (``model.task: sequence-classification``): text -> label."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config
from fedbip_ray.core.feddpa import GLOBAL_ADAPTER, LOCAL_ADAPTER
from fedbip_ray.core.interface import DPAOptions
from fedbip_ray.models.factory import add_adapter_copy, build_model
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
    """A text classifier + adapter (tokenizer in ``tokenizer``); cross-entropy on the label.

    Under a strategy with a dual adapter (FedDPA, ``dual`` its options) the model carries a
    second adapter ``local`` whose outputs ``mix`` weights (:mod:`fedbip_ray.training.dpa`):
    ``train`` runs the two phases, ``evaluate`` mixes the adapters per instance.
    """

    def __init__(self, cfg: Config, num_labels: int, device: torch.device | None = None,
                 base: FrozenBase | None = None) -> None:
        self.cfg, self.seed = cfg, cfg.seed
        self.device = setup_torch(cfg, device)
        self.precision = self._resolve_precision()
        model, self.tokenizer = build_model(cfg.model, num_labels, cfg.seed,
                                            self._shared_model(base))
        self.dual: DPAOptions | None = cfg.strategy.build().client_options.dual_adapter
        if self.dual is not None:
            add_adapter_copy(model, LOCAL_ADAPTER)
        self._adopt(model.to(self.device))
        if self.dual is not None:
            from fedbip_ray.training.dpa import AdapterMix

            self.mix = AdapterMix(self.model)

    def encode(self, frame: pd.DataFrame) -> Encoded:
        """Tokenize a split once (padded to its longest example, at most max_length)."""
        return encode_texts(self.tokenizer, frame, self.cfg.model.max_length)

    def logits(self, inputs: Inputs) -> torch.Tensor:
        """(b, K) float32 logits of one batch."""
        with self.autocast():
            out = self.model(**inputs)
        return out.logits.float()

    def train(self, data: Encoded, epochs: int, seed: int, prox_mu: float = 0.0) -> FitMetrics:
        """Train the loaded state in place for ``epochs`` local epochs (a dual adapter: both
        phases, :func:`fedbip_ray.training.dpa.dual_fit`). Returns metrics."""
        self.model.train()

        def loss_of(batch: tuple[Inputs, torch.Tensor]) -> torch.Tensor:
            inputs, y = batch
            return torch.nn.functional.cross_entropy(self.logits(inputs), y)

        bs = self.cfg.train.batch_size

        def run(params: list[torch.nn.Parameter] | None, phase_seed: int) -> FitMetrics:
            return self._run_epochs(epochs, phase_seed, prox_mu,
                                    lambda gen: text_batches(data, bs, gen, self.device),
                                    loss_of, params)

        if self.dual is None:
            return run(None, seed)
        from fedbip_ray.training.dpa import dual_fit

        return dual_fit(self, self.dual, run, seed)

    def ala_losses(self, data: Encoded, rows: slice) -> Iterator[torch.Tensor]:
        """The loss of each full batch of ``data[rows]`` in data order (FedALA's weight
        learning, :mod:`fedbip_ray.training.ala`)."""
        from fedbip_ray.training.ala import full_batches

        sub = Encoded(data.input_ids[rows], data.attention_mask[rows], data.labels[rows])
        for part in full_batches(len(sub), self.cfg.train.batch_size):
            chunk = Encoded(sub.input_ids[part], sub.attention_mask[part], sub.labels[part])
            for inputs, y in text_batches(chunk, len(chunk), None, self.device):
                yield torch.nn.functional.cross_entropy(self.logits(inputs), y)

    def evaluate(self, data: Encoded, references: Encoded | None = None,
                 seed: int = 0) -> EvalMetrics:
        """Accuracy and mean loss of the loaded state on ``data``; a dual adapter mixes its
        adapters per instance with weights from the client's training instances
        ``references`` (drawn with ``seed``)."""
        if self.dual is None:
            batches = text_batches(data, self.cfg.train.eval_batch_size, None, self.device)
            return classification_eval(self.model, batches, self.logits, len(data))
        if references is None:
            raise ValueError("strategy 'feddpa' weighs its adapters per instance against the "
                             "client's training instances: none were given")
        return self.mixed_eval(data, self.instance_alphas(data, references, seed))

    # -- FedDPA -----------------------------------------------------------------------------
    def mixed_logits(self, inputs: Inputs, alpha: torch.Tensor) -> torch.Tensor:
        """(b, K) float32 logits with every adapted module's output ``(1 − α_i)·global +
        α_i·local`` for row ``i`` (``alpha`` (b,))."""
        with self.mix.use({GLOBAL_ADAPTER: 1.0 - alpha, LOCAL_ADAPTER: alpha}):
            return self.logits(inputs)

    def mixed_eval(self, data: Encoded, alpha: np.ndarray) -> EvalMetrics:
        """Accuracy and mean loss on ``data`` with row ``i`` mixed by ``alpha[i]`` (n,)."""
        a = torch.as_tensor(np.asarray(alpha, dtype=np.float32))
        bs = self.cfg.train.eval_batch_size

        def batches() -> Iterator[tuple[tuple[Inputs, torch.Tensor], torch.Tensor]]:
            rows = text_batches(data, bs, None, self.device)
            for start, (inputs, y) in zip(range(0, len(data), bs), rows, strict=True):
                yield (inputs, a[start:start + len(y)]), y

        return classification_eval(self.model, batches(), lambda b: self.mixed_logits(*b),
                                   len(data))

    @torch.no_grad()
    def local_representations(self, data: Encoded) -> np.ndarray:
        """(n, h) float32 last-layer hidden state of each row under the local adapter alone:
        the first token's (an encoder's CLS) or, without a CLS token, the last attended one."""
        self.model.eval()
        backbone = self.model.get_base_model().base_model  # e.g. BertModel: no head
        out = []
        with self.mix.use({GLOBAL_ADAPTER: 0.0, LOCAL_ADAPTER: 1.0}):
            for inputs, _ in text_batches(data, self.cfg.train.eval_batch_size, None,
                                          self.device):
                with self.autocast():
                    hidden = backbone(**inputs).last_hidden_state
                out.append(self._pooled(hidden, inputs["attention_mask"]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def _pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(b, h) of hidden (b, L, h): CLS, else the last attended token."""
        if getattr(self.tokenizer, "cls_token", None) is not None:
            return hidden[:, 0]
        if getattr(self.tokenizer, "padding_side", "right") == "left":
            return hidden[:, -1]
        return hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]

    def instance_alphas(self, data: Encoded, references: Encoded, seed: int) -> np.ndarray:
        """(n,) float64 local-adapter weight of each row of ``data`` against ``instance_num``
        random rows of ``references`` (:func:`fedbip_ray.training.dpa.alphas`)."""
        from fedbip_ray.training.dpa import alphas

        assert self.dual is not None

        def embed_train(rows: np.ndarray) -> np.ndarray:
            idx = torch.as_tensor(rows)
            sub = Encoded(references.input_ids[idx], references.attention_mask[idx],
                          references.labels[idx])
            return self.local_representations(sub)

        test = self.local_representations(data) if len(data) else np.zeros((0, 0))
        return alphas(test, embed_train, len(references), self.dual, seed)
