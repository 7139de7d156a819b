"""FedALA's adaptive local aggregation on a trainer (the rule: :mod:`fedbip_ray.core.fedala`).

The trainer offers ``ala_losses(data, rows)``: the loss of each full batch of ``data[rows]``
in data order (train mode, forward under its autocast), as the authors' ``DataLoader(...,
drop_last=True)`` over their random slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbip_ray.core.fedala import ala_converged, ala_mix, ala_slice, ala_step, higher_columns
from fedbip_ray.core.interface import ALAOptions

MAX_EPOCHS = 1000  # a guard on the first-time loop (the authors' has none)


@dataclass(frozen=True)
class ALAOutcome:
    """``state`` (D,) float32 start model; ``weights`` (P,) float32 the higher layers' W (None:
    skipped, the global model equals the local one there); ``epochs``; ``loss`` the last
    epoch's last batch loss (NaN when skipped)."""

    state: np.ndarray
    weights: np.ndarray | None
    epochs: int
    loss: float


def model_order(trainer: Any) -> list[str]:
    """The trainer's trainable parameter names in the model's own order (the authors' "last
    ``p`` layers" are the last of ``model.parameters()``)."""
    return [n for n, _ in trainer.model.named_parameters() if n in trainer.params]


def _higher_grad(trainer: Any, names: list[str], cols: np.ndarray) -> np.ndarray:
    """(P,) float32 loss gradient of the higher-layer parameters, in ``cols`` order."""
    full = np.zeros(trainer.layout.size, dtype=np.float32)
    for n in names:
        g = trainer.params[n].grad
        if g is not None:
            full[trainer.layout.index(n)] = g.detach().float().reshape(-1).cpu().numpy()
    return full[cols]


def adaptive_local_aggregation(trainer: Any, data: Any, local: np.ndarray, global_: np.ndarray,
                               weights: np.ndarray | None, opts: ALAOptions,
                               seed: int) -> ALAOutcome:
    """Learn W for ``local`` (D,) and ``global_`` (D,) on a ``rand_percent`` slice of ``data``
    (``weights`` None: first time, W = 1 and iterate until the loss std converges; else one
    epoch from ``weights``). The trainer's parameters hold the returned state afterwards."""
    order = model_order(trainer)
    names = order if opts.layer_idx == 0 else order[-opts.layer_idx:]
    cols = higher_columns(trainer.layout, opts.layer_idx, order)
    local = np.asarray(local, dtype=np.float32)
    global_ = np.asarray(global_, dtype=np.float32)
    diff = global_[cols] - local[cols]
    first = weights is None
    w = np.ones(cols.size, dtype=np.float32) if first else np.asarray(weights, np.float32).copy()
    if not diff.any():  # the authors skip ALA while the global model equals the local one
        state = ala_mix(local, global_, w, cols)
        trainer.load_state(state)
        return ALAOutcome(state, None if first else w, 0, math.nan)
    rows = ala_slice(len(data), opts.rand_percent, np.random.default_rng(seed))
    frozen = [p for n, p in trainer.params.items() if n not in set(names)]
    for p in frozen:
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        trainer.load_state(ala_mix(local, global_, w, cols))
        trainer.model.train()
        while True:
            last = math.nan
            for loss in trainer.ala_losses(data, rows):
                for n in names:
                    trainer.params[n].grad = None
                loss.backward()
                w = ala_step(w, _higher_grad(trainer, names, cols), diff, opts.eta)
                trainer.load_state(ala_mix(local, global_, w, cols))
                last = float(loss.detach())
            losses.append(last)
            if not first or len(losses) >= MAX_EPOCHS or math.isnan(last) \
                    or ala_converged(losses, opts.num_pre_loss, opts.threshold):
                break
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in trainer.params.values():
            p.grad = None
    state = ala_mix(local, global_, w, cols)
    trainer.load_state(state)
    return ALAOutcome(state, w, len(losses), losses[-1])


def full_batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches of ``n`` rows, the last incomplete one dropped (kept when it is the
    only one)."""
    out = [slice(s, s + batch_size) for s in range(0, n - batch_size + 1, batch_size)]
    return out or ([slice(0, n)] if n else [])
