"""Task vectors: a flat float32 buffer plus a layout (names, shapes, offsets).

A :class:`Layout` describes how the trainable parameters of an adapter (LoRA factors, a trained
head, ...) are packed into one flat buffer of ``D = layout.size`` float32 values. A
:class:`TaskVector` is such a buffer together with its layout. Arithmetic always returns new
objects and a layout mismatch raises :class:`LayoutMismatchError`; it never warns and skips.

Torch tensors are accepted duck-typed (anything with ``.detach``); this module never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np

__all__ = [
    "Layout",
    "LayoutMismatchError",
    "TaskVector",
    "as_float32",
    "module_groups",
    "module_key",
]


class LayoutMismatchError(ValueError):
    """Two layouts (or a layout and a set of tensors) do not describe the same parameters."""


def as_float32(x: Any) -> np.ndarray:
    """Return ``x`` as a float32 numpy array (torch tensors via ``.detach().cpu().float()``).

    No copy is made when ``x`` already is a float32 numpy array.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class Layout:
    """Packing of named parameters into one flat buffer.

    ``names[i]`` has shape ``shapes[i]`` and occupies ``buffer[offsets[i] : offsets[i] + numel]``.
    Parameters are contiguous and in the given order; ``size`` is the total length ``D``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    _position: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        offsets = tuple(int(o) for o in self.offsets)
        if not len(names) == len(shapes) == len(offsets):
            raise ValueError(
                f"layout needs one shape and one offset per name, got {len(names)} names, "
                f"{len(shapes)} shapes, {len(offsets)} offsets"
            )
        position = {name: i for i, name in enumerate(names)}
        if len(position) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"duplicate parameter name {dup!r} in layout")
        expected = 0
        for name, shape, offset in zip(names, shapes, offsets, strict=True):
            if any(d < 0 for d in shape):
                raise ValueError(f"parameter {name!r} has a negative dimension in {shape}")
            if offset != expected:
                raise ValueError(f"parameter {name!r} has offset {offset}, expected {expected}")
            expected += _numel(shape)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "_position", position)

    @classmethod
    def from_shapes(cls, named_shapes: Mapping[str, Sequence[int]]) -> Layout:
        """Build a contiguous layout from ``{name: shape}``, keeping the mapping's order."""
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        offsets: list[int] = []
        offset = 0
        for name, shape in named_shapes.items():
            shp = tuple(int(d) for d in shape)
            names.append(name)
            shapes.append(shp)
            offsets.append(offset)
            offset += _numel(shp)
        return cls(tuple(names), tuple(shapes), tuple(offsets))

    @property
    def size(self) -> int:
        """Total number of scalars ``D``."""
        if not self.names:
            return 0
        return self.offsets[-1] + _numel(self.shapes[-1])

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._position

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of parameter ``name`` (KeyError if absent)."""
        return self.shapes[self._position[name]]

    def index(self, name: str) -> slice:
        """Slice of the flat buffer holding parameter ``name`` (KeyError if absent)."""
        i = self._position[name]
        return slice(self.offsets[i], self.offsets[i] + _numel(self.shapes[i]))

    def first_difference(self, other: Layout) -> str | None:
        """One-line description of the first parameter where ``other`` differs from ``self``.

        ``self`` is the expected layout. Returns None when the layouts are equal.
        """
        for i, name in enumerate(self.names):
            if i >= len(other.names):
                return f"missing parameter {name!r}"
            if other.names[i] != name:
                if name not in other:
                    return f"missing parameter {name!r}"
                return f"parameter {other.names[i]!r} at position {i}, expected {name!r}"
            if other.shapes[i] != self.shapes[i]:
                return f"parameter {name!r} has shape {other.shapes[i]}, expected {self.shapes[i]}"
        if len(other.names) > len(self.names):
            return f"unexpected parameter {other.names[len(self.names)]!r}"
        return None

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON-able form: ``{"names": [...], "shapes": [[...]], "offsets": [...]}``."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "offsets": list(self.offsets),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layout:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(data["names"]),
            tuple(tuple(s) for s in data["shapes"]),
            tuple(data["offsets"]),
        )


# Segments that name an adapter's sub-module rather than the adapted module (peft naming).
_ADAPTER_SEGMENTS = frozenset(
    {
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
        "ia3_l",
        "modules_to_save",
    }
)
_ADAPTER_NAME = "default"


def module_key(name: str) -> str:
    """Module that parameter ``name`` belongs to (peft naming).

    Strips, in order and each at most once: a trailing ``weight``/``bias`` segment, a trailing
    adapter name segment (``default``, or any name right after an adapter segment, e.g.
    FedDPA's ``local``), then a trailing adapter segment (``lora_A``, ``lora_B``,
    ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``, ``ia3_l``,
    ``modules_to_save``). So ``...query.lora_A.default.weight`` and
    ``...query.lora_B.local.weight``
    both map to ``...query``, and ``classifier.modules_to_save.default.bias`` to ``classifier``.
    A name that is a single segment is returned unchanged.
    """
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts.pop()
    if len(parts) > 1 and (parts[-1] == _ADAPTER_NAME
                           or (len(parts) > 2 and parts[-2] in _ADAPTER_SEGMENTS)):
        parts.pop()
    if len(parts) > 1 and parts[-1] in _ADAPTER_SEGMENTS:
        parts.pop()
    return ".".join(parts)


def module_groups(layout: Layout) -> dict[str, np.ndarray]:
    """Module key -> int64 indices (into the flat buffer) of all its parameters.

    Keys are in order of first appearance in the layout; indices are ascending per parameter.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for name in layout.names:
        sl = layout.index(name)
        parts.setdefault(module_key(name), []).append(np.arange(sl.start, sl.stop, dtype=np.int64))
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


@dataclass(frozen=True)
class TaskVector:
    """A flat float32 buffer (shape ``(D,)``, ``D = layout.size``) plus its :class:`Layout`."""

    buffer: np.ndarray
    layout: Layout

    def __post_init__(self) -> None:
        buf = self.buffer
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"buffer must be a numpy.ndarray, got {type(buf).__name__}")
        if buf.dtype != np.float32:
            raise TypeError(f"buffer must be float32, got {buf.dtype}")
        if buf.ndim != 1 or buf.shape[0] != self.layout.size:
            raise ValueError(
                f"buffer must have shape ({self.layout.size},), got {tuple(buf.shape)}"
            )

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], layout: Layout | None = None) -> TaskVector:
        """Pack ``{name: array or tensor}`` into a task vector.

        Without ``layout`` one is built from the tensors' shapes in mapping order. With a
        ``layout``, names and shapes must match it exactly (mapping order is irrelevant);
        otherwise :class:`LayoutMismatchError` names the first offending parameter.
        """
        arrays = {name: as_float32(t) for name, t in tensors.items()}
        if layout is None:
            layout = Layout.from_shapes({name: a.shape for name, a in arrays.items()})
        else:
            for name, shape in zip(layout.names, layout.shapes, strict=True):
                if name not in arrays:
                    raise LayoutMismatchError(f"missing parameter {name!r}")
                if arrays[name].shape != shape:
                    raise LayoutMismatchError(
                        f"parameter {name!r} has shape {arrays[name].shape}, expected {shape}"
                    )
            extra = next((n for n in arrays if n not in layout), None)
            if extra is not None:
                raise LayoutMismatchError(f"unexpected parameter {extra!r}")
        buffer = np.empty(layout.size, dtype=np.float32)
        for name in layout.names:
            buffer[layout.index(name)] = arrays[name].ravel()
        return cls(buffer, layout)

    @classmethod
    def zeros(cls, layout: Layout) -> TaskVector:
        """All-zero task vector of ``layout``."""
        return cls(np.zeros(layout.size, dtype=np.float32), layout)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{name: float32 array of the parameter's shape}`` (copies, layout order)."""
        return {
            name: self.buffer[self.layout.index(name)].reshape(shape).copy()
            for name, shape in zip(self.layout.names, self.layout.shapes, strict=True)
        }

    def _check_same_layout(self, other: TaskVector) -> None:
        if other.layout != self.layout:
            diff = self.layout.first_difference(other.layout) or "layouts differ"
            raise LayoutMismatchError(f"task vector layouts differ: {diff}")

    def __add__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_same_layout(other)
        return TaskVector(self.buffer + other.buffer, self.layout)

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_same_layout(other)
        return TaskVector(self.buffer - other.buffer, self.layout)

    def __mul__(self, scalar: object) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, Real):
            return NotImplemented
        return TaskVector(self.buffer * np.float32(scalar), self.layout)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return TaskVector(-self.buffer, self.layout)

    def norm(self) -> float:
        """L2 norm of the buffer, as a Python float."""
        return math.sqrt(float(np.dot(self.buffer, self.buffer)))
