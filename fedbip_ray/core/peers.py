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

from .fedawa import awa_stats, optimize_logits
from .interface import AggregationInput, AggregationResult, ClientOptions
from .params import POSITIVE, Check, param
from .similarity import lora_role
from .taskvector import Layout
from .weights import fedavg_weights

__all__ = ["FedAWAStrategy", "FedSALoRAStrategy", "shared_columns"]

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

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        cols = shared_columns(inp.layout, self.share_modules_to_save)
        if cols.size == 0:
            raise ValueError("strategy 'fedsa-lora' needs LoRA A factors (peft lora_A) in the "
                             "adapter; the layout has none")
        w = fedavg_weights(inp.counts)
        states = inp.theta()
        states[:, cols] = (w[0] @ states[:, cols].astype(np.float64)).astype(np.float32)
        return AggregationResult(states=states, weights=w)


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

    def _logits(self, inp: AggregationInput) -> np.ndarray:
        """``(N,)`` starting logits: the memory where a participant has one, else ``nₖ/Σn``."""
        counts = np.asarray(inp.counts, dtype=np.float64)
        start = counts / counts.sum()
        if inp.memory is None or inp.memory.shape[1] < 1:
            return start
        mem = inp.memory[:, 0]
        return np.where(np.isfinite(mem), mem, start)

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        theta = inp.theta()
        share = fedavg_weights(inp.counts)[0]
        global_ = share.astype(np.float32) @ inp.states
        stats = awa_stats(theta, global_, self.reg_distance)
        lr = self.server_lr or (1e-3 if self.server_optimizer == "adam" else 1e-2)
        p, logits = optimize_logits(self._logits(inp), stats, steps=self.server_epochs,
                                    optimizer=self.server_optimizer, lr=lr)
        avg = (self.gamma * p).astype(np.float32) @ theta
        return AggregationResult(
            states=np.repeat(avg[None, :], inp.n, axis=0),
            weights=np.repeat(p[None, :], inp.n, axis=0),
            memory=logits[:, None],
        )
