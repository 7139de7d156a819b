"""Peer methods from 2024-2025 as strategies: FedSA-LoRA and FedAWA.

- ``fedsa-lora`` (Guo et al., ICLR 2025): the LoRA ``A`` factors are averaged over the round's
  clients (example-weighted, as FedAvg), everything else (the ``B`` factors and, like the
  authors' GLUE config ``local_param: ['lora_B', 'classifier']``, the trained head /
  ``modules_to_save``) stays each client's own.
- ``fedawa`` (Shi et al., CVPR 2025): one global model ``γ Σₖ pₖ θₖ`` whose weights ``p`` are
  optimized on the client vectors ``θₖ − θ_g`` (:mod:`.fedawa`); not personalized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .fedawa import AWAPartial, awa_partial, optimize_logits
from .interface import (
    AggregationInput,
    AggregationResult,
    ClientOptions,
    Plan,
    RoundMeta,
    run_strategy,
)
from .params import POSITIVE, Check, param
from .similarity import lora_role
from .taskvector import Layout
from .weights import fedavg_weights

__all__ = ["FedAWAStrategy", "FedSALoRAStrategy", "fedavg_states", "shared_columns"]

_SAVED = ".modules_to_save."


def shared_columns(layout: Layout, modules_to_save: bool) -> np.ndarray:
    """int64 indices of the parameters FedSA-LoRA averages: every LoRA ``A`` factor (peft
    ``lora_A`` / ``lora_embedding_A``), plus the ``modules_to_save`` copies when asked."""
    parts = [
        np.arange(layout.index(n).start, layout.index(n).stop, dtype=np.int64)
        for n in layout.names
        if lora_role(n) == "A" or (modules_to_save and _SAVED in n)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def fedavg_states(inp: AggregationInput, row: np.ndarray) -> np.ndarray:
    """``(N, D)`` float32: the same ``row @ θ`` (``row`` ``(N,)``) for every client, computed
    once."""
    r = np.asarray(row).astype(np.float32)
    avg = r @ inp.states
    avg += r @ inp.deltas
    return np.repeat(avg[None, :], inp.n, axis=0)


@dataclass(frozen=True)
class FedSALoRAStrategy:
    """FedSA-LoRA: ``Aᵢ ← Σₖ (nₖ/Σn) Aₖ`` for every client, all other parameters ``θᵢ``.

    ``share_modules_to_save``: also average the ``modules_to_save`` copies (the head; off as
    in the authors' configs, where the classifier is a local parameter).
    ``weights`` in the result are the ``A`` factors' (FedAvg) weights.
    """

    name: ClassVar[str] = "fedsa-lora"
    share_modules_to_save: bool = param(False, Check("bool"))

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions()

    def statistics(self, inp: AggregationInput) -> None:
        return None

    def plan(self, stats: None, meta: RoundMeta) -> Plan:
        if shared_columns(meta.layout, self.share_modules_to_save).size == 0:
            raise ValueError("strategy 'fedsa-lora' needs LoRA A factors (peft lora_A) in the "
                             "adapter; the layout has none")
        return Plan(fedavg_weights(meta.counts))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        cols = shared_columns(inp.layout, self.share_modules_to_save)
        states = inp.theta()
        if cols.size:
            shared = plan.weights[0] @ states[:, cols].astype(np.float64)
            states[:, cols] = shared.astype(np.float32)
        return states

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return run_strategy(self, inp)


@dataclass(frozen=True)
class FedAWAStrategy:
    """FedAWA with the authors' defaults (see :mod:`.fedawa` for the rule).

    Attributes:
        server_epochs: optimizer steps on the weights per round (authors: 1).
        server_optimizer: ``adam`` or ``sgd``.
        server_lr: step size; None = the authors' (1e-3 for Adam, 1e-2 for SGD).
        gamma: scale of the aggregate, ``θ_g ← γ Σ pₖ θₖ`` (authors: 1).
        reg_distance: ``cos`` (1 − cosine) or ``euc`` (mean squared difference) in ``C``.

    ``θ_g`` is the example-weighted mean of the states the participants received (the global
    model whenever they all received it, e.g. under full participation). The logits travel
    in ``memory`` (one column); a participant without one starts from its example share.
    """

    name: ClassVar[str] = "fedawa"
    server_epochs: int = param(1, Check("integer", ge=1, le=10_000))
    server_optimizer: str = param("adam", Check("choice", choices=("adam", "sgd")))
    server_lr: float | None = param(None, Check("number", gt=0, optional=True))
    gamma: float = param(1.0, POSITIVE)
    reg_distance: str = param("cos", Check("choice", choices=("cos", "euc")))

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions()

    def _logits(self, meta: RoundMeta) -> np.ndarray:
        """``(N,)`` starting logits: the memory where a participant has one, else ``nₖ/Σn``."""
        counts = np.asarray(meta.counts, dtype=np.float64)
        start = counts / counts.sum()
        if meta.memory is None or meta.memory.shape[1] < 1:
            return start
        mem = meta.memory[:, 0]
        return np.where(np.isfinite(mem), mem, start)

    def statistics(self, inp: AggregationInput) -> AWAPartial:
        share = fedavg_weights(inp.counts)[0]
        return awa_partial(inp.theta(), share.astype(np.float32) @ inp.states)

    def plan(self, stats: AWAPartial, meta: RoundMeta) -> Plan:
        lr = self.server_lr or (1e-3 if self.server_optimizer == "adam" else 1e-2)
        p, logits = optimize_logits(self._logits(meta), stats.finish(self.reg_distance),
                                    steps=self.server_epochs, optimizer=self.server_optimizer,
                                    lr=lr)
        return Plan(np.repeat(p[None, :], meta.n, axis=0), memory=logits[:, None],
                    scale=self.gamma * p)

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        assert plan.scale is not None
        avg = plan.scale.astype(np.float32) @ inp.theta()
        return np.repeat(avg[None, :], inp.n, axis=0)

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return run_strategy(self, inp)
