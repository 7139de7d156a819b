"""Local training and evaluation of one client's adapter (no Ray here; the actor wraps it)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config, ModelConfig, TrainConfig
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.models.factory import build_model, get_state, trainable_parameters


@dataclass(frozen=True)
class Encoded:
    """A tokenized split: input_ids/attention_mask (n, L) int64, labels (n,) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def seed_for(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (client, round, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return int(h % (2**31 - 1))


def make_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the trainable parameters (AdamW or SGD, per ``train``)."""
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)


def run_local_epochs(
    params: list[torch.nn.Parameter],
    tc: TrainConfig,
    epochs: int,
    seed: int,
    prox_mu: float,
    batches: Callable[[torch.Generator], Iterable[Any]],
    loss_of: Callable[[Any], torch.Tensor],
) -> dict[str, Any]:
    """The local training loop shared by every trainer (the model is already in train mode).

    Seeds torch and the batch order with ``seed``, adds the FedProx term
    ``prox_mu / 2 * ||w - w_received||^2`` when ``prox_mu > 0``, and stops after
    ``tc.max_steps_per_round`` steps if set. Returns train_loss (mean), steps, train_seconds.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    opt = make_optimizer(params, tc)
    limit = tc.max_steps_per_round or math.inf
    total, steps, start = 0.0, 0, time.perf_counter()
    for _ in range(epochs):
        for batch in batches(gen):
            loss = loss_of(batch)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * prox_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
            if steps >= limit:
                break
        if steps >= limit:
            break
    mean = total / steps if steps else math.nan
    return {"train_loss": mean if math.isfinite(mean) else math.nan, "steps": steps,
            "train_seconds": time.perf_counter() - start}


class AdapterState:
    """Flat (D,) float32 views of a trainer's trainable parameters (needs ``model``,
    ``params`` (name -> Parameter, layout order) and ``layout``)."""

    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    layout: Layout

    def initial_state(self) -> np.ndarray:
        """The adapter's initial trainable state, flat (D,) float32."""
        arrays = get_state(self.model)
        return np.concatenate([arrays[n].ravel() for n in self.layout.names]).astype(np.float32)

    def current_state(self) -> np.ndarray:
        """The current trainable state, flat (D,) float32."""
        with torch.no_grad():
            flat = torch.cat([p.detach().float().reshape(-1) for p in self.params.values()])
        return flat.cpu().numpy().astype(np.float32, copy=False)

    def start_gradient_sum(self) -> None:
        """Sum every trainable parameter's loss gradient over the coming backward passes
        (post-accumulate hooks; the optimizer is untouched)."""
        self.stop_gradient_sum()
        self._grad_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params.values()]

        def hook(buf: torch.Tensor) -> Callable[[torch.Tensor], None]:
            def add(p: torch.Tensor) -> None:
                if p.grad is not None:
                    buf.add_(p.grad.detach().float())
            return add

        self._grad_hooks = [p.register_post_accumulate_grad_hook(hook(b))
                            for p, b in zip(self.params.values(), self._grad_sum, strict=True)]

    def stop_gradient_sum(self) -> np.ndarray | None:
        """Remove the hooks; the negated gradient sum since :meth:`start_gradient_sum`, flat
        (D,) float32 (the descent direction, same sign convention as a task vector)."""
        for h in getattr(self, "_grad_hooks", []):
            h.remove()
        self._grad_hooks = []
        bufs, self._grad_sum = getattr(self, "_grad_sum", None), None
        if bufs is None:
            return None
        return (-torch.cat([b.reshape(-1) for b in bufs])).cpu().numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def load_state(self, state: np.ndarray) -> None:
        """Copy a flat (D,) state into the trainable parameters."""
        if state.shape != (self.layout.size,):
            raise ValueError(f"state has shape {state.shape}, adapter needs ({self.layout.size},)")
        src = torch.from_numpy(np.array(state, dtype=np.float32, copy=True))
        for name, p in self.params.items():
            p.copy_(src[self.layout.index(name)].view(p.shape).to(device=p.device, dtype=p.dtype))


class LocalTrainer(AdapterState):
    """Holds one base model + adapter; loads any flat adapter state, trains, evaluates.

    States are flat float32 vectors (D,) in the order of ``layout``.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, num_labels: int, seed: int) -> None:
        if model_cfg.torch_threads:
            torch.set_num_threads(model_cfg.torch_threads)
        self.model_cfg, self.train_cfg, self.seed = model_cfg, train_cfg, seed
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.tokenizer = build_model(model_cfg, num_labels, seed)
        self.model = model.to(self.device)
        self.params = trainable_parameters(self.model)
        self.layout = Layout.from_shapes({n: tuple(p.shape) for n, p in self.params.items()})

    # -- data -------------------------------------------------------------------------------
    def encode(self, frame: pd.DataFrame) -> Encoded:
        """Tokenize a split once (padded to its longest example, at most max_length)."""
        if len(frame) == 0:
            z = torch.zeros((0, 1), dtype=torch.long)
            return Encoded(z, z, torch.zeros(0, dtype=torch.long))
        enc = self.tokenizer(
            list(frame["text"].astype(str)),
            truncation=True,
            max_length=self.model_cfg.max_length,
            padding="longest",
            return_tensors="pt",
        )
        labels = torch.tensor(frame["label"].to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
        return Encoded(enc["input_ids"], enc["attention_mask"], labels)

    def _batches(self, data: Encoded, batch_size: int, gen: torch.Generator | None):
        n = len(data)
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            mask = data.attention_mask[idx]
            width = int(mask.sum(dim=1).max()) if len(idx) else 1
            yield (
                data.input_ids[idx, :width].to(self.device),
                mask[:, :width].to(self.device),
                data.labels[idx].to(self.device),
            )

    # -- training ---------------------------------------------------------------------------
    def train(self, data: Encoded, epochs: int, seed: int, prox_mu: float = 0.0) -> dict[str, Any]:
        """Train the loaded state in place for ``epochs`` local epochs. Returns metrics."""
        self.model.train()

        def loss_of(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            ids, mask, y = batch
            out = self.model(input_ids=ids, attention_mask=mask)
            return torch.nn.functional.cross_entropy(out.logits.float(), y)

        return run_local_epochs(list(self.params.values()), self.train_cfg, epochs, seed, prox_mu,
                                lambda gen: self._batches(data, self.train_cfg.batch_size, gen), loss_of)

    @torch.no_grad()
    def evaluate(self, data: Encoded) -> dict[str, float]:
        """Accuracy and mean loss of the loaded state on ``data``."""
        self.model.eval()
        if len(data) == 0:
            return {"accuracy": math.nan, "loss": math.nan, "n": 0}
        correct, loss_sum = 0, 0.0
        for ids, mask, y in self._batches(data, self.train_cfg.eval_batch_size, None):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        n = len(data)
        return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}


def make_trainer(cfg: Config, num_labels: int) -> Any:
    """The trainer for ``cfg.model.task``; every trainer has the LocalTrainer interface
    (layout, initial_state, current_state, load_state, encode, train, evaluate, model)."""
    task = cfg.model.task
    if task == "causal-lm":
        from fedbip_ray.runtime.lm_trainer import CausalLMTrainer

        return CausalLMTrainer(cfg.model, cfg.train, num_labels, cfg.seed)
    if task == "image-classification":
        from fedbip_ray.runtime.image_trainer import ImageTrainer

        return ImageTrainer(cfg, num_labels)
    return LocalTrainer(cfg.model, cfg.train, num_labels, cfg.seed)
