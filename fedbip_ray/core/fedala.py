"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the global model.

The server is FedAvg (one global model ``g`` for all). Each client ``i`` keeps its own trained
model ``θᵢ`` and, on receiving ``g``, forms its start model element-wise::

    θ̂ᵢ = θᵢ + (g − θᵢ) ⊙ Wᵢ   on the higher layers (the last ``layer_idx`` parameter tensors)
    θ̂ᵢ = g                    on the lower layers

with ``Wᵢ ∈ [0, 1]`` (init 1) learned on a random ``rand_percent`` slice of its train data by
``Wᵢ ← clip(Wᵢ − η ∇_θ̂ L ⊙ (g − θᵢ), 0, 1)`` per batch; the first time until the std of the
last ``num_pre_loss`` epoch losses is below ``threshold``, later one epoch (the authors'
``utils/ALA.py``). Here the functions on flat ``(D,)`` float32 states; the torch loop lives in
:mod:`fedbip_ray.training.ala`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .interface import (
    AggregationInput,
    AggregationResult,
    ALAOptions,
    ClientOptions,
    Plan,
    RoundMeta,
    run_strategy,
)
from .params import POSITIVE, Check, param
from .peers import fedavg_states
from .taskvector import Layout
from .weights import fedavg_weights

__all__ = ["FedALAStrategy", "ala_converged", "ala_mix", "ala_slice", "ala_step",
           "higher_columns"]


def higher_columns(layout: Layout, layer_idx: int,
                   order: Sequence[str] | None = None) -> np.ndarray:
    """int64 indices (ascending) of the last ``layer_idx`` parameter tensors of ``layout``
    in ``order`` (the model's parameter order; default the layout's); 0 = every tensor, as
    the authors' ``params[-0:]``."""
    names = list(order if order is not None else layout.names)
    names = names if layer_idx == 0 else names[-layer_idx:]
    parts = [np.arange(layout.index(n).start, layout.index(n).stop, dtype=np.int64)
             for n in names]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def ala_mix(local: np.ndarray, global_: np.ndarray, weights: np.ndarray,
            cols: np.ndarray) -> np.ndarray:
    """``(D,)`` float32 start model: ``global_`` on every column but ``cols``, where it is
    ``local + (global_ − local) ⊙ weights`` (``weights`` ``(len(cols),)``)."""
    out = np.array(global_, dtype=np.float32, copy=True)
    lo = np.asarray(local, dtype=np.float32)[cols]
    out[cols] = lo + (out[cols] - lo) * np.asarray(weights, dtype=np.float32)
    return out


def ala_step(weights: np.ndarray, grad: np.ndarray, diff: np.ndarray, eta: float) -> np.ndarray:
    """One weight update ``clip(W − η · grad ⊙ diff, 0, 1)`` (all ``(P,)``; ``grad`` the loss
    gradient at the mixed model, ``diff = g − θ``) as float32."""
    w = np.asarray(weights, dtype=np.float32) - np.float32(eta) * grad * diff
    return np.clip(w, 0.0, 1.0).astype(np.float32, copy=False)


def ala_converged(losses: list[float], num_pre_loss: int, threshold: float) -> bool:
    """More than ``num_pre_loss`` losses recorded and the std of the last ``num_pre_loss``
    below ``threshold`` (the authors' stopping rule)."""
    return len(losses) > num_pre_loss and float(np.std(losses[-num_pre_loss:])) < threshold


def ala_slice(n: int, rand_percent: int, rng: np.random.Generator) -> slice:
    """A contiguous slice of ``rand_percent`` % of ``n`` examples at a random start."""
    k = int(rand_percent / 100 * n)
    start = int(rng.integers(0, n - k + 1))
    return slice(start, start + k)


@dataclass(frozen=True)
class FedALAStrategy:
    """FedALA with the authors' defaults (``main.py``: ``rand_percent=80``, ``layer_idx=2``,
    ``eta=1.0``; ``ALA``: ``threshold=0.1``, ``num_pre_loss=10``).

    The aggregation is FedAvg; each client's stored state becomes its ALA start model (see
    :attr:`ClientOptions.ala`), whose weights ``Wᵢ`` travel in the server's per-client memory.
    """

    name: ClassVar[str] = "fedala"
    rand_percent: int = param(80, Check("integer", ge=1, le=100))
    layer_idx: int = param(2, Check("integer", ge=0))
    eta: float = param(1.0, POSITIVE)
    threshold: float = param(0.1, POSITIVE)
    num_pre_loss: int = param(10, Check("integer", ge=1, le=10_000))

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(ala=ALAOptions(self.rand_percent, self.layer_idx, self.eta,
                                            self.threshold, self.num_pre_loss))

    def statistics(self, inp: AggregationInput) -> None:
        return None

    def plan(self, stats: None, meta: RoundMeta) -> Plan:
        if self.layer_idx > len(meta.layout.names):
            raise ValueError(f"strategy 'fedala': layer_idx {self.layer_idx} exceeds the "
                             f"adapter's {len(meta.layout.names)} parameter tensors")
        return Plan(fedavg_weights(meta.counts))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        return fedavg_states(inp, plan.weights[0])

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return run_strategy(self, inp)
