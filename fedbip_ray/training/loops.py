"""The one local-epoch loop and the one evaluation loop that every trainer uses."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from fedbip_ray.config import TrainConfig
from fedbip_ray.training.protocol import EvalMetrics, FitMetrics

B = TypeVar("B")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the trainable parameters (AdamW or SGD, per ``train``)."""
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision autocast for bf16/fp16 on ``device``; a no-op context for fp32."""
    dtype = _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _grads_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)


def run_local_epochs(
    params: list[torch.nn.Parameter],
    tc: TrainConfig,
    epochs: int,
    seed: int,
    prox_mu: float,
    batches: Callable[[torch.Generator], Iterable[B]],
    loss_of: Callable[[B], torch.Tensor],
    precision: str = "fp32",
    device: torch.device | None = None,
    on_grads: Callable[[], None] | None = None,
) -> FitMetrics:
    """The local training loop shared by every trainer (the model is already in train mode).

    Seeds torch and the batch order with ``seed``, adds the FedProx term
    ``prox_mu / 2 * ||w - w_received||^2`` when ``prox_mu > 0``, scales the loss with a
    ``GradScaler`` when ``precision`` is fp16, calls ``on_grads`` after each backward pass
    (gradients unscaled, before the optimizer step), and stops after
    ``tc.max_steps_per_round`` steps if set. ``loss_of`` runs the forward pass (under the
    trainer's autocast). Returns train_loss (mean), steps, train_seconds.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    opt = make_optimizer(params, tc)
    scaler = torch.amp.GradScaler((device or torch.device("cpu")).type, enabled=precision == "fp16")
    limit = tc.max_steps_per_round or math.inf
    total, steps, start = 0.0, 0, time.perf_counter()
    for _ in range(epochs):
        for batch in batches(gen):
            loss = loss_of(batch)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = loss + 0.5 * prox_mu * prox
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if on_grads is not None:
                scaler.unscale_(opt)
                if not scaler.is_enabled() or _grads_finite(params):
                    on_grads()
            scaler.step(opt)
            scaler.update()
            total += float(loss.detach())
            steps += 1
            if steps >= limit:
                break
        if steps >= limit:
            break
    mean = total / steps if steps else math.nan
    return {"train_loss": mean if math.isfinite(mean) else math.nan, "steps": steps,
            "train_seconds": time.perf_counter() - start}


def ordered_indices(n: int, batch_size: int, gen: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Batches of row indices (each (<= batch_size,) int64): a seeded permutation when ``gen``
    is given (training), data order otherwise (evaluation)."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def evaluation_loop(batches: Iterable[B],
                    step: Callable[[B], Mapping[str, float]]) -> dict[str, float]:
    """Sum each batch's ``step`` results key by key, in batch order, without gradients."""
    totals: dict[str, float] = {}
    for batch in batches:
        for key, value in step(batch).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def empty_metrics() -> EvalMetrics:
    """The scores of an empty split."""
    return {"accuracy": math.nan, "loss": math.nan, "n": 0}


def classification_eval(model: torch.nn.Module, batches: Iterable[tuple[Any, torch.Tensor]],
                        logits_of: Callable[[Any], torch.Tensor], n: int) -> EvalMetrics:
    """Accuracy, mean cross-entropy and its per-example standard deviation (``loss_sd``) over
    ``n`` examples in eval mode.

    ``batches`` yields (inputs, labels (b,) int64); ``logits_of(inputs)`` gives (b, K) logits.
    """
    model.eval()
    if n == 0:
        return empty_metrics()

    def step(batch: tuple[Any, torch.Tensor]) -> dict[str, float]:
        inputs, y = batch
        logits = logits_of(inputs).float()
        per = torch.nn.functional.cross_entropy(logits, y, reduction="none").double()
        return {"loss": float(per.sum()), "loss_sq": float((per * per).sum()),
                "correct": int((logits.argmax(-1) == y).sum())}

    totals = evaluation_loop(batches, step)
    mean = totals["loss"] / n
    sd = math.sqrt(max(totals["loss_sq"] / n - mean * mean, 0.0))
    return {"accuracy": totals["correct"] / n, "loss": mean, "loss_sd": sd, "n": n}
