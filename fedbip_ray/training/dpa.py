"""FedDPA's dual adapter on a trainer (the rules: :mod:`fedbip_ray.core.feddpa`).

The peft model carries the adapters ``default`` (global) and ``local``, both active in every
LoRA layer (:func:`fedbip_ray.models.factory.add_adapter_copy`). :class:`AdapterMix` weights
their outputs by forward hooks, so one forward pass computes, in every adapted module,
``w_global · global + w_local · local`` with per-row weights where asked: the authors'
``set_local`` combination (a weighted sum of the adapters' outputs in each layer), which for
a classifier is not the same as mixing two models' logits (the layers in between are not
linear).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedbip_ray.core.feddpa import GLOBAL_ADAPTER, LOCAL_ADAPTER, adapter_columns, instance_weights
from fedbip_ray.core.interface import DPAOptions
from fedbip_ray.training.protocol import FitMetrics
from fedbip_ray.training.seeds import seed_for

Weight = float | torch.Tensor
Phase = Callable[[list[torch.nn.Parameter], int], FitMetrics]


class AdapterMix:
    """Output weights of the two adapters of a peft model, applied by forward hooks.

    Every LoRA ``B`` factor's output (the adapter's update ``B A x`` before peft's scaling)
    and every ``modules_to_save`` wrapper's output (the ``default`` copy's, which peft
    computes, plus the ``local`` copy's, computed here) are multiplied by their adapter's
    weight: a float, or a ``(b,)`` tensor, one weight per batch row. An adapter in
    ``frozen`` contributes a detached output (the authors' ``tmp_result.detach()``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        self.weights: dict[str, Weight] = {GLOBAL_ADAPTER: 1.0, LOCAL_ADAPTER: 0.0}
        self.frozen: frozenset[str] = frozenset()
        self.handles: list[Any] = []
        for module in model.modules():
            if isinstance(module, LoraLayer):
                if module.lora_embedding_A or getattr(module, "lora_variant", None):
                    raise ValueError("strategy 'feddpa' mixes plain LoRA layers: embedding "
                                     "LoRA and LoRA variants (DoRA) are not supported")
                for name in (GLOBAL_ADAPTER, LOCAL_ADAPTER):
                    self.handles.append(
                        module.lora_B[name].register_forward_hook(self._lora_hook(name)))
            elif isinstance(module, ModulesToSaveWrapper):
                self.handles.append(module.register_forward_hook(self._wrapper_hook,
                                                                 with_kwargs=True))

    @contextmanager
    def use(self, weights: Mapping[str, Weight], frozen: tuple[str, ...] = ()) -> Iterator[None]:
        """Forward passes inside use ``weights`` {adapter: weight}; ``frozen`` adapters'
        outputs are detached."""
        old = self.weights, self.frozen
        self.weights, self.frozen = dict(weights), frozenset(frozen)
        try:
            yield
        finally:
            self.weights, self.frozen = old

    def _is_zero(self, name: str) -> bool:
        w = self.weights[name]
        return not isinstance(w, torch.Tensor) and w == 0

    def _scaled(self, out: torch.Tensor, name: str) -> torch.Tensor:
        if self._is_zero(name):
            return torch.zeros_like(out)
        out = out.detach() if name in self.frozen else out
        w = self.weights[name]
        if isinstance(w, torch.Tensor):
            return out * w.to(device=out.device, dtype=out.dtype).view(-1, *[1] * (out.ndim - 1))
        return out if w == 1 else out * w

    def _lora_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(_module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            return self._scaled(out, name)
        return hook

    def _wrapper_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      out: torch.Tensor) -> torch.Tensor:
        mixed = self._scaled(out, GLOBAL_ADAPTER)
        if self._is_zero(LOCAL_ADAPTER):
            return mixed
        local = module.modules_to_save[LOCAL_ADAPTER](*args, **kwargs)
        return mixed + self._scaled(local, LOCAL_ADAPTER)


def adapter_params(params: Mapping[str, torch.nn.Parameter],
                   adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of ``adapter`` (a name segment equal to it), in ``params`` order."""
    return [p for n, p in params.items() if adapter in n.split(".")]


@contextmanager
def only_trainable(params: Mapping[str, torch.nn.Parameter],
                   adapter: str) -> Iterator[list[torch.nn.Parameter]]:
    """Inside, only ``adapter``'s parameters (yielded) require gradients."""
    others = [p for n, p in params.items() if adapter not in n.split(".")]
    for p in others:
        p.requires_grad_(False)
    try:
        yield adapter_params(params, adapter)
    finally:
        for p in others:
            p.requires_grad_(True)


def global_trained(state: np.ndarray, initial: np.ndarray, layout: Any) -> bool:
    """The global adapter's columns of ``state`` (D,) differ from ``initial`` (D,)."""
    cols = adapter_columns(layout, GLOBAL_ADAPTER)
    return not np.array_equal(state[cols], initial[cols])


def merge_fits(parts: list[FitMetrics]) -> FitMetrics:
    """Steps and seconds summed over the phases, ``train_loss`` their step-weighted mean."""
    steps = sum(p["steps"] for p in parts)
    losses = [(p["train_loss"], p["steps"]) for p in parts if math.isfinite(p["train_loss"])]
    counted = sum(s for _, s in losses)
    loss = sum(v * s for v, s in losses) / counted if counted else math.nan
    return {"train_loss": loss, "steps": steps,
            "train_seconds": sum(p["train_seconds"] for p in parts)}


def dual_fit(trainer: Any, opts: DPAOptions, run: Phase, seed: int) -> FitMetrics:
    """One round's training of both adapters of ``trainer`` (its ``params``, ``mix``,
    ``layout``): the local adapter with the global one frozen, outputs weighted
    ``local_weight`` / ``1 − local_weight`` (once the global adapter has been trained), then
    the global adapter alone. ``run(params, seed)`` trains ``params`` for the round."""
    parts: list[FitMetrics] = []
    lw = opts.local_weight
    if global_trained(trainer.current_state(), trainer.initial_state(), trainer.layout):
        with only_trainable(trainer.params, LOCAL_ADAPTER) as params, trainer.mix.use(
                {GLOBAL_ADAPTER: 1.0 - lw, LOCAL_ADAPTER: lw}, frozen=(GLOBAL_ADAPTER,)):
            parts.append(run(params, seed_for(seed, 1)))
    with only_trainable(trainer.params, GLOBAL_ADAPTER) as params, trainer.mix.use(
            {GLOBAL_ADAPTER: 1.0, LOCAL_ADAPTER: 0.0}):
        parts.append(run(params, seed))
    return merge_fits(parts)


def reference_rows(n: int, n_train: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, min(k, n_train))`` int64: for each of ``n`` instances, distinct random training
    rows (the authors' ``random.sample`` per test instance)."""
    k = min(k, n_train)
    rows = [rng.choice(n_train, size=k, replace=False) for _ in range(n)]
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, k), dtype=np.int64)


def alphas(test: np.ndarray, embed_train: Callable[[np.ndarray], np.ndarray], n_train: int,
           opts: DPAOptions, seed: int) -> np.ndarray:
    """``(n,)`` float64 local-adapter weight of each instance with representation ``test``
    ``(n, h)``; ``embed_train(rows)`` gives the ``(len(rows), h)`` representations of those
    training rows. Zero when there are no training rows."""
    n = len(test)
    if n == 0 or n_train == 0:
        return np.zeros(n)
    rows = reference_rows(n, n_train, opts.instance_num, np.random.default_rng(seed))
    uniq, inv = np.unique(rows, return_inverse=True)
    refs = embed_train(uniq)[inv.reshape(rows.shape)]
    return instance_weights(test, refs, opts.max_weight)
