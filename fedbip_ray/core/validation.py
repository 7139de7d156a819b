"""Server-side checks of a client update before it enters aggregation."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from .taskvector import Layout

__all__ = ["UpdateRejected", "validate_update"]


class UpdateRejected(ValueError):
    """A client update failed validation; the message is a one-line reason."""


def validate_update(
    vector: np.ndarray,
    layout: Layout,
    expected: Layout,
    *,
    max_norm: float | None = None,
    on_excess_norm: Literal["reject", "clip"] = "reject",
) -> tuple[np.ndarray, float]:
    """Check a client's task vector; return ``(vector, original L2 norm)``.

    Args:
        vector: ``(D,)`` float32 flat task vector as sent by the client.
        layout: layout the client declared.
        expected: layout the server expects (``D = expected.size``).
        max_norm: optional bound on the L2 norm.
        on_excess_norm: ``"reject"`` raises, ``"clip"`` rescales to ``max_norm``.

    Returns:
        The vector (a rescaled float32 copy if clipped, else the input) and its original norm.

    Raises:
        UpdateRejected: layout mismatch (naming the first differing parameter), a non-array,
            wrong dtype or shape, NaN/Inf entries (with their count), or a norm above
            ``max_norm`` with ``on_excess_norm="reject"``.
        ValueError: invalid ``max_norm`` or ``on_excess_norm`` (a server configuration error).
    """
    if on_excess_norm not in ("reject", "clip"):
        raise ValueError(f"on_excess_norm must be 'reject' or 'clip', got {on_excess_norm!r}")
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    if layout != expected:
        diff = expected.first_difference(layout) or "layouts differ"
        raise UpdateRejected(f"layout mismatch: {diff}")
    if not isinstance(vector, np.ndarray):
        raise UpdateRejected(f"update must be a numpy array, got {type(vector).__name__}")
    if vector.dtype != np.float32:
        raise UpdateRejected(f"update has dtype {vector.dtype}, expected float32")
    if vector.shape != (expected.size,):
        raise UpdateRejected(f"update has shape {vector.shape}, expected ({expected.size},)")
    bad = int(vector.size - np.count_nonzero(np.isfinite(vector)))
    if bad:
        raise UpdateRejected(f"update has {bad} non-finite (NaN/Inf) entries of {vector.size}")
    norm = math.sqrt(float(np.dot(vector, vector)))
    if not math.isfinite(norm):  # float32 overflow of the sum of squares
        norm = float(np.linalg.norm(vector.astype(np.float64)))
    if max_norm is not None and norm > max_norm:
        if on_excess_norm == "reject":
            raise UpdateRejected(f"update norm {norm:.6g} exceeds the bound {max_norm:.6g}")
        return vector * np.float32(max_norm / norm), norm
    return vector, norm
