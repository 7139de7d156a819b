"""One frozen base model shared by every client actor of a node (torch only; no Ray).

A :class:`FrozenBase` is a base model split in two: a *skeleton* (the module tree with every
parameter on the ``meta`` device, so it weighs a few kilobytes; buffers and configs stay real)
and one contiguous numpy array per distinct parameter. Put into Ray's object store once, the
arrays are mapped read-only and zero-copy into each worker of a node that fetches them;
:func:`adopt_base` then rebuilds the model around those arrays (``torch.from_numpy``, no copy),
so N actors on a node hold the frozen weights once. Only what each actor trains (adapter,
``modules_to_save`` copies such as a classifier head), its optimizer state and activations are
its own. Tied parameters (e.g. SmolLM2's input and output embeddings) stay tied.

The shared arrays must never be written: peft freezes the base and trains copies, and
:func:`privatize_trainables` gives any trainable parameter that still points into them a
private copy. Weights that would need a cast or another device cannot be shared
(:func:`unfit_reason`); the trainer then loads a private copy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from fedbip_ray.config import Config

ParamSlot = tuple[nn.Module, str]


@dataclass(frozen=True)
class FrozenBase:
    """A base model as the object store holds it.

    ``skeleton``: the module tree, parameters on ``meta`` (shapes, dtypes and the
    ``requires_grad`` flags kept), buffers real. ``arrays``: {first parameter name (as
    ``named_parameters`` yields it): the parameter's values, C-contiguous, its own dtype}.
    ``task``: the ``model.task`` it was built for.
    """

    skeleton: nn.Module
    arrays: dict[str, np.ndarray]
    task: str

    @property
    def nbytes(self) -> int:
        """Bytes of the shared parameter arrays."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' floating dtype (the first floating one; float32 if none)."""
        for arr in self.arrays.values():
            if np.issubdtype(arr.dtype, np.floating):
                return torch.from_numpy(np.empty(0, dtype=arr.dtype)).dtype
        return torch.float32


def _slots(model: nn.Module) -> list[tuple[ParamSlot, nn.Parameter]]:
    """Every (module, attribute) that holds a parameter, tied ones included."""
    return [((mod, key), p) for mod in model.modules()
            for key, p in mod._parameters.items() if p is not None]


def export_base(model: nn.Module, task: str) -> FrozenBase:
    """Split ``model`` (on CPU, without adapter) into a :class:`FrozenBase`.

    ``model`` becomes the skeleton: its parameters are replaced in place by ``meta`` ones (one
    per distinct parameter, so ties survive). The arrays share memory with the old parameters
    (no copy here; the object store copies them once). Raises ValueError for a parameter that
    is not on CPU or has no numpy dtype (e.g. bfloat16).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype == torch.bfloat16:
            raise ValueError(f"parameter {name}: {p.dtype} on {p.device} cannot be shared")
        arrays[name] = np.ascontiguousarray(p.detach().numpy())
    metas: dict[int, nn.Parameter] = {}
    for (mod, key), p in _slots(model):
        if id(p) not in metas:
            metas[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                        requires_grad=p.requires_grad)
        mod._parameters[key] = metas[id(p)]
    return FrozenBase(model, arrays, task)


def adopt_base(base: FrozenBase) -> nn.Module:
    """The skeleton with each parameter a read-only view of its shared array (no copy).

    The skeleton is used in place (each ``ray.get`` of a :class:`FrozenBase` yields a fresh
    one). Raises ValueError when the arrays do not match the skeleton's parameters.
    """
    model = base.skeleton
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(base.arrays):
        raise ValueError("shared base: arrays do not match the skeleton's parameters")
    shared: dict[int, nn.Parameter] = {}
    with warnings.catch_warnings():  # the arrays are read-only on purpose
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, p in model.named_parameters():
            arr = base.arrays[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"shared base: {name} has shape {arr.shape}, expected "
                                 f"{tuple(p.shape)}")
            shared[id(p)] = nn.Parameter(torch.from_numpy(arr), requires_grad=p.requires_grad)
    for (mod, key), p in _slots(model):
        mod._parameters[key] = shared[id(p)]
    return model


def unfit_reason(base: FrozenBase, task: str, device: torch.device,
                 dtype: torch.dtype) -> str | None:
    """Why a trainer for ``task`` on ``device`` with ``dtype`` weights cannot use ``base``
    (None when it can)."""
    if base.task != task:
        return f"the shared base was built for {base.task}, the trainer is {task}"
    if device.type != "cpu":
        return f"the client trains on {device}: its base weights live there"
    if base.dtype != dtype:
        return f"the trainer needs {dtype} weights, the shared base holds {base.dtype}"
    return None


def shared_ranges(base: FrozenBase) -> list[tuple[int, int]]:
    """[start, end) addresses of the shared arrays in this process."""
    return [(a.ctypes.data, a.ctypes.data + a.nbytes) for a in base.arrays.values()]


def in_ranges(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``tensor``'s data starts inside one of ``ranges``."""
    ptr = tensor.data_ptr()
    return any(start <= ptr < end for start, end in ranges)


def privatize_trainables(model: nn.Module, base: FrozenBase) -> int:
    """Give every trainable parameter of ``model`` whose data lies in the shared arrays a
    private writable copy; returns how many needed one (0 with peft's usual wrapping)."""
    ranges = shared_ranges(base)
    copies: dict[int, nn.Parameter] = {}
    for (mod, key), p in _slots(model):
        if p.requires_grad and (id(p) in copies or in_ranges(p, ranges)):
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
            mod._parameters[key] = copies[id(p)]
    return len(copies)


def load_base(cfg: Config, num_labels: int) -> nn.Module:
    """The base model (no adapter) of ``cfg.model.task`` on CPU in float32, exactly as the
    trainer's own private load builds it (same seed, same head)."""
    task = cfg.model.task
    if task == "causal-lm":
        from fedbip_ray.models.lm import load_causal_lm, load_lm_tokenizer

        vocab = len(load_lm_tokenizer(cfg.model))
        return load_causal_lm(cfg.model, vocab, cfg.seed, torch.device("cpu"), torch.float32)
    if task == "image-classification":
        from fedbip_ray.models.vision import load_base_image_model

        return load_base_image_model(cfg.model, num_labels, cfg.seed)
    from fedbip_ray.models.factory import load_base_model, load_tokenizer

    return load_base_model(cfg.model, num_labels, len(load_tokenizer(cfg.model)), cfg.seed)


def build_frozen_base(cfg: Config, num_labels: int) -> FrozenBase:
    """:func:`load_base` split by :func:`export_base` (what goes into the object store)."""
    return export_base(load_base(cfg, num_labels), cfg.model.task)
