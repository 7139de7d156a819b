"""The interface every trainer offers the client actor (and the benchmarks)."""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

import numpy as np

from fedbip_ray.core.taskvector import Layout


class _FitRequired(TypedDict):
    train_loss: float
    steps: int
    train_seconds: float


class FitMetrics(_FitRequired, total=False):
    """What a local training call reports (the actor adds ``peak_rss_mib``)."""

    peak_rss_mib: float


class _EvalRequired(TypedDict):
    accuracy: float
    loss: float
    n: int


class EvalMetrics(_EvalRequired, total=False):
    """Scores of one split; classifiers add ``loss_sd`` (the standard deviation of the
    per-example loss), causal LMs ``exact_match`` and ``rouge_l``."""

    loss_sd: float
    exact_match: float
    rouge_l: float


class Trainer(Protocol):
    """One base model + adapter that loads any flat adapter state, trains and evaluates.

    States are flat float32 vectors (D,) in the order of ``layout`` (the trainable parameters
    sorted by name). ``encode`` turns a shard split into the trainer's own data type, which
    ``train`` and ``evaluate`` take.
    """

    layout: Layout
    device: Any  # torch.device
    model: Any  # torch.nn.Module (a peft model)

    def initial_state(self) -> np.ndarray: ...

    def current_state(self) -> np.ndarray: ...

    def load_state(self, state: np.ndarray) -> None: ...

    def encode(self, frame: Any) -> Any: ...

    def train(self, data: Any, epochs: int, seed: int, prox_mu: float = 0.0) -> FitMetrics: ...

    def evaluate(self, data: Any) -> EvalMetrics: ...

    def start_gradient_sum(self) -> None: ...

    def stop_gradient_sum(self) -> np.ndarray | None: ...
