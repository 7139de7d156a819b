"""What every trainer shares: device and precision, the flat adapter state, the gradient sum."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import numpy as np
import torch

from fedbip_ray.config import Config
from fedbip_ray.models.shared_base import FrozenBase, adopt_base, privatize_trainables, unfit_reason
from fedbip_ray.training.device import Precision, bf16_supported, resolve_precision, torch_device
from fedbip_ray.training.loops import autocast, run_local_epochs
from fedbip_ray.training.protocol import FitMetrics
from fedbip_ray.training.state import (
    GradientSum,
    flat_state,
    layout_of,
    load_flat_state,
    trainable_parameters,
)

B = TypeVar("B")
log = logging.getLogger("fedbip.trainer")


def setup_torch(cfg: Config, device: torch.device | None) -> torch.device:
    """Apply ``model.torch_threads``; the device to use (:func:`torch_device` when None)."""
    if cfg.model.torch_threads:
        torch.set_num_threads(cfg.model.torch_threads)
    return device if device is not None else torch_device(cfg.resources.device)


class AdapterTrainer:
    """Base of the trainers: ``model`` (a peft model on ``device``), ``params`` (its trainable
    parameters, name -> Parameter, layout order), ``layout``, ``precision``.

    Subclasses build the model in ``__init__`` (over :meth:`_shared_model` when a shared base
    is given) and call :meth:`_adopt`; they implement ``encode``, ``train`` (through
    :meth:`_run_epochs`) and ``evaluate``. ``shared_base`` is the :class:`FrozenBase` whose
    arrays hold this trainer's frozen weights (None: a private copy).
    """

    cfg: Config
    device: torch.device
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    precision: Precision
    cpu_precision: Precision = "fp32"
    shared_base: FrozenBase | None = None

    def _resolve_precision(self) -> Precision:
        kind = self.device.type if self.device.type == "cuda" else "cpu"
        return resolve_precision(self.cfg.train.precision, kind, bf16_supported(self.device),
                                 self.cpu_precision)

    def _shared_model(self, base: FrozenBase | None,
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module | None:
        """The base model over ``base``'s shared read-only arrays, or None (the caller loads a
        private copy) when there is no ``base`` or it does not fit this trainer's device and
        weight ``dtype`` (one log line says why)."""
        if base is None:
            return None
        why = unfit_reason(base, self.cfg.model.task, self.device, dtype)
        if why is not None:
            log.warning("base model: a private copy (%s)", why)
            return None
        self.shared_base = base
        return adopt_base(base)

    def _adopt(self, model: torch.nn.Module) -> None:
        """Take ``model`` (already on ``device``) and record its trainable parameters (each a
        private copy, also when the frozen weights are shared)."""
        if self.shared_base is not None:
            privatize_trainables(model, self.shared_base)
        self.model = model
        self.params = trainable_parameters(model)
        self.layout = layout_of(self.params)
        self._initial = flat_state(self.params)
        self._grad_sum: GradientSum | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        """The forward-pass autocast of this trainer's precision."""
        return autocast(self.precision, self.device)

    # -- state ----------------------------------------------------------------------------
    def initial_state(self) -> np.ndarray:
        """The adapter's initial trainable state, flat (D,) float32 (a copy)."""
        return self._initial.copy()

    def current_state(self) -> np.ndarray:
        """The current trainable state, flat (D,) float32."""
        return flat_state(self.params)

    def load_state(self, state: np.ndarray) -> None:
        """Copy a flat (D,) state into the trainable parameters."""
        load_flat_state(self.params, self.layout, state)

    # -- gradient signal ------------------------------------------------------------------
    def start_gradient_sum(self) -> None:
        """Sum every trainable parameter's loss gradient over the coming training steps
        (the optimizer is untouched)."""
        self._grad_sum = GradientSum(self.params)

    def stop_gradient_sum(self) -> np.ndarray | None:
        """The negated gradient sum since :meth:`start_gradient_sum`, flat (D,) float32 (the
        descent direction, same sign convention as a task vector); None if none was started."""
        summed, self._grad_sum = self._grad_sum, None
        return None if summed is None else summed.descent()

    # -- training -------------------------------------------------------------------------
    def _run_epochs(self, epochs: int, seed: int, prox_mu: float,
                    batches: Callable[[torch.Generator], Iterable[B]],
                    loss_of: Callable[[B], torch.Tensor],
                    params: list[torch.nn.Parameter] | None = None) -> FitMetrics:
        """:func:`run_local_epochs` over this trainer's parameters (or the subset ``params``),
        precision and device."""
        summed = self._grad_sum
        params = list(self.params.values()) if params is None else params
        return run_local_epochs(params, self.cfg.train, epochs, seed, prox_mu,
                                batches, loss_of, precision=self.precision, device=self.device,
                                on_grads=summed.add if summed is not None else None)
