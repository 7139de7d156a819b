"""Flat adapter states <-> the trainable (peft) parameters of a model.

A state is a (D,) float32 vector: the trainable parameters, sorted by name, each flattened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from fedbip_ray.core.taskvector import Layout


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name, in a stable (sorted) order."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: params[n] for n in sorted(params)}


def layout_of(params: Mapping[str, torch.nn.Parameter]) -> Layout:
    """The layout (names, shapes, offsets) of ``params`` in their order."""
    return Layout.from_shapes({n: tuple(p.shape) for n, p in params.items()})


def flat_state(params: Mapping[str, torch.nn.Parameter]) -> np.ndarray:
    """The parameters as one flat (D,) float32 copy, in ``params`` order."""
    with torch.no_grad():
        flat = torch.cat([p.detach().float().reshape(-1) for p in params.values()])
    return flat.cpu().numpy().astype(np.float32, copy=False)


@torch.no_grad()
def load_flat_state(params: Mapping[str, torch.nn.Parameter], layout: Layout,
                    state: np.ndarray) -> None:
    """Copy a flat (D,) state into ``params`` (each cast to its own device and dtype)."""
    if state.shape != (layout.size,):
        raise ValueError(f"state has shape {state.shape}, adapter needs ({layout.size},)")
    src = torch.from_numpy(np.array(state, dtype=np.float32, copy=True))
    for name, p in params.items():
        p.copy_(src[layout.index(name)].view(p.shape).to(device=p.device, dtype=p.dtype))


class GradientSum:
    """The sum of the parameters' loss gradients over several backward passes, float32."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.params = list(params.values())
        self.buffers = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    def add(self) -> None:
        """Add the current ``.grad`` of every parameter (call after backward, before step)."""
        for p, buf in zip(self.params, self.buffers, strict=True):
            if p.grad is not None:
                buf.add_(p.grad.detach().float())

    def descent(self) -> np.ndarray:
        """The negated sum, flat (D,) float32 (the same sign convention as a task vector)."""
        return ((-torch.cat([b.reshape(-1) for b in self.buffers])).cpu().numpy()
                .astype(np.float32, copy=False))


GradientCallback = Callable[[], None]
