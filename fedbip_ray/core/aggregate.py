"""Server-level aggregation: one ``(N, N) @ (N, D)`` product per call (per module group)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["aggregate_layerwise", "aggregate_task_vectors", "clip_rows", "mix_models"]


def _matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


def _weights(w: np.ndarray, n: int, name: str = "weights") -> np.ndarray:
    arr = np.asarray(w)
    if arr.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got {arr.shape}")
    return arr.astype(np.float32)


def mix_models(models: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mixtures ``weights @ models``: ``(N, N) x (N, D) -> (N, D)`` float32."""
    m = _matrix(models, "models")
    return _weights(weights, m.shape[0]) @ m


def aggregate_task_vectors(
    states: np.ndarray, deltas: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """FedBip server step ``θ̄ᵢ + Σₖ wᵢₖ τₖ`` for all clients at once.

    Args:
        states: ``(N, D)`` float32 personalized states the clients started from.
        deltas: ``(N, D)`` float32 task vectors.
        weights: ``(N, N)`` aggregation weights.

    Returns:
        ``(N, D)`` float32 new states: one GEMM, then an in-place add.
    """
    s = _matrix(states, "states")
    d = _matrix(deltas, "deltas")
    if s.shape != d.shape:
        raise ValueError(f"states {s.shape} and deltas {d.shape} differ in shape")
    out = _weights(weights, d.shape[0]) @ d
    out += s
    return out


def as_index(idx: np.ndarray) -> slice | np.ndarray:
    """A contiguous ascending index array as a slice (so that column blocks are views)."""
    i = np.asarray(idx, dtype=np.int64).ravel()
    if i.size and i[-1] - i[0] + 1 == i.size and np.all(np.diff(i) == 1):
        return slice(int(i[0]), int(i[-1]) + 1)
    return i


def aggregate_layerwise(
    states: np.ndarray,
    deltas: np.ndarray,
    layer_weights: np.ndarray,
    group_index: Sequence[np.ndarray],
) -> np.ndarray:
    """Layer-wise server step: group ``g`` of columns uses its own weights.

    Args:
        states: ``(N, D)`` float32.
        deltas: ``(N, D)`` float32.
        layer_weights: ``(G, N, N)`` one weight matrix per group.
        group_index: ``G`` int index arrays into ``D`` that partition ``range(D)``.

    Returns:
        ``(N, D)`` float32: ``states[:, I_g] + W_g @ deltas[:, I_g]`` for every group.
    """
    s = _matrix(states, "states")
    d = _matrix(deltas, "deltas")
    if s.shape != d.shape:
        raise ValueError(f"states {s.shape} and deltas {d.shape} differ in shape")
    n, dim = d.shape
    lw = np.asarray(layer_weights)
    if lw.ndim != 3 or lw.shape[0] != len(group_index) or lw.shape[1:] != (n, n):
        raise ValueError(
            f"layer_weights must have shape ({len(group_index)}, {n}, {n}), got {lw.shape}"
        )
    flat = [np.asarray(idx, dtype=np.int64).ravel() for idx in group_index]
    all_idx = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    if all_idx.size and (all_idx.min() < 0 or all_idx.max() >= dim):
        raise ValueError(f"group_index has indices outside [0, {dim})")
    covered = np.bincount(all_idx, minlength=dim)
    if covered.size != dim or not np.all(covered == 1):
        raise ValueError("group_index must partition range(D): every column exactly once")
    out = np.empty_like(s)
    for w, idx in zip(lw, flat, strict=True):
        cols = as_index(idx)
        block = _weights(w, n, "layer weights") @ d[:, cols]
        block += s[:, cols]
        out[:, cols] = block
    return out


def clip_rows(deltas: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale each row of ``deltas`` ``(N, D)`` to L2 norm at most ``max_norm``: ``(N, D)`` float32.

    Returns the input itself (no copy) when no row exceeds the bound.
    """
    if not (np.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    d = _matrix(deltas, "deltas")
    norms = np.sqrt(np.einsum("ij,ij->i", d, d).astype(np.float64))
    over = norms > max_norm
    if not over.any():
        return d
    scale = np.ones_like(norms)
    scale[over] = max_norm / norms[over]
    return d * scale.astype(np.float32)[:, None]
