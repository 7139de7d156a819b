"""Which device and numeric precision a trainer uses (pure functions; torch only where named).

Ray 2.60 no longer blanks ``CUDA_VISIBLE_DEVICES`` for an actor that asked for zero GPUs, so
``torch.cuda.is_available()`` alone would put such an actor on a GPU it was never given. The
device therefore follows the GPUs Ray assigned the actor (``ray.get_gpu_ids()``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from fedbip_ray.config import ConfigError

DeviceKind = Literal["cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]

log = logging.getLogger(__name__)


def choose_device(assigned_gpus: Sequence[Any] | None, cuda_available: bool,
                  requested: str = "auto", node_id: str = "") -> DeviceKind:
    """The device kind for a trainer.

    Args:
        assigned_gpus: the GPU ids Ray assigned this actor (``ray.get_gpu_ids()``, fractional
            shares included); None outside Ray (then only ``cuda_available`` counts).
        cuda_available: whether torch sees a CUDA device.
        requested: ``resources.device``: ``auto``, ``cpu`` or ``cuda``.
        node_id: the Ray node id, named in the warning and the error.

    Zero assigned GPUs give ``cpu`` whatever ``CUDA_VISIBLE_DEVICES`` says. Assigned GPUs that
    torch cannot see raise a one-line :class:`ConfigError` for ``cuda`` and give ``cpu`` with
    a warning for ``auto``.
    """
    if requested == "cpu":
        return "cpu"
    where = f"node {node_id}" if node_id else "this process"
    if assigned_gpus is not None and len(assigned_gpus) == 0:
        if requested == "cuda":
            raise ConfigError("resources.device 'cuda': Ray assigned no GPU to the client actor on "
                              f"{where}; set resources.num_gpus_per_client > 0")
        return "cpu"
    if cuda_available:
        return "cuda"
    if requested == "cuda":
        raise ConfigError(f"resources.device 'cuda': torch sees no CUDA device on {where} "
                          f"(assigned GPUs: {list(assigned_gpus or [])})")
    if assigned_gpus:
        log.warning("client actor on %s was assigned GPUs %s but torch sees no CUDA device; "
                    "training on cpu", where, list(assigned_gpus))
    return "cpu"


def resolve_precision(requested: str, device_kind: str, bf16_supported: bool,
                      cpu_default: Precision = "fp32") -> Precision:
    """``train.precision`` -> fp32 | bf16 | fp16. ``auto``: bf16 on a CUDA device that supports
    it, else fp16 on CUDA, ``cpu_default`` on CPU. Explicit values are kept."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device_kind == "cuda":
        return "bf16" if bf16_supported else "fp16"
    return cpu_default


def torch_device(requested: str = "auto", assigned_gpus: Sequence[Any] | None = None,
                 node_id: str = "") -> Any:
    """A ``torch.device`` from :func:`choose_device` (``cuda`` = the actor's first visible GPU)."""
    import torch

    return torch.device(choose_device(assigned_gpus, torch.cuda.is_available(), requested, node_id))


def bf16_supported(device: Any) -> bool:
    """Whether ``device`` (a ``torch.device``) runs bf16 autocast natively."""
    import torch

    return device.type == "cuda" and bool(torch.cuda.is_bf16_supported())
