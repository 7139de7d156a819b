"""Aggregation weight matrices.

Every function returns an ``(N, N)`` float64 matrix ``W`` whose row ``i`` holds the weights that
client ``i``'s new model puts on each client's contribution; every row sums to 1 and every
division is guarded (a degenerate row falls back to the identity row, i.e. local training).
"""

from __future__ import annotations

import numpy as np

from .params import NONNEGATIVE, POSITIVE, Check

__all__ = [
    "SELF_SIMILARITY",
    "SELF_SIMILARITY_CHECK",
    "TEMPERATURE",
    "THRESHOLD",
    "TOP_K",
    "fedamp_from_gram",
    "fedamp_weights",
    "fedavg_weights",
    "local_weights",
    "oracle_weights",
    "personalized_weights",
    "validate_weight_options",
]

_TINY = 1e-12


def _square(s: np.ndarray, name: str = "s") -> np.ndarray:
    m = np.asarray(s, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) matrix, got shape {m.shape}")
    return m


def _normalize_rows(w: np.ndarray) -> np.ndarray:
    """Divide each row by its sum; rows with a non-finite or ~0 sum become identity rows."""
    total = w.sum(axis=1)
    bad = ~np.isfinite(total) | (np.abs(total) < _TINY)
    out = np.divide(w, np.where(bad, 1.0, total)[:, None])
    if bad.any():
        out[bad] = np.eye(w.shape[0])[bad]
    return out


THRESHOLD = Check("number", ge=-1.0, le=1.0, optional=True)
TEMPERATURE = Check("number", gt=0.0, optional=True)
TOP_K = Check("integer", ge=1, optional=True)


def validate_weight_options(
    *,
    threshold: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
) -> None:
    """Raise ValueError (a :class:`ParamError`) naming the argument when a personalized-weight
    option is invalid."""
    THRESHOLD("threshold", threshold)
    TEMPERATURE("temperature", temperature)
    TOP_K("top_k", top_k)


def _top_k_mask(s: np.ndarray, kept: np.ndarray, top_k: int) -> np.ndarray:
    """Keep self plus the ``top_k - 1`` most similar kept others per row.

    Ties at the cut-off value are all kept, so the result is permutation equivariant.
    """
    n = s.shape[0]
    others = np.where(kept, s, -np.inf)
    others = np.where(np.isnan(others), -np.inf, others)
    np.fill_diagonal(others, -np.inf)
    k = top_k - 1
    if k <= 0:
        return np.eye(n, dtype=bool)
    if k >= n - 1:
        return kept
    # k-th largest value per row among the others
    cutoff = -np.partition(-others, k - 1, axis=1)[:, k - 1]
    mask = kept & (others >= cutoff[:, None]) & np.isfinite(others)
    np.fill_diagonal(mask, True)
    return mask


SELF_SIMILARITY: tuple[str, ...] = ("one", "max-peer")
SELF_SIMILARITY_CHECK = Check("choice", choices=SELF_SIMILARITY)


def _thresholded(sim: np.ndarray, threshold: float, relative: bool) -> np.ndarray:
    """Mask of entries at or above ``threshold`` (relative: above the row's mean peer +
    threshold)."""
    if not relative:
        return sim >= threshold
    n = sim.shape[0]
    if n < 2:
        return np.ones_like(sim, dtype=bool)
    off = ~np.eye(n, dtype=bool)
    peers = np.where(off & ~np.isnan(sim), sim, 0.0)
    count = np.maximum((off & ~np.isnan(sim)).sum(axis=1), 1)
    mean = peers.sum(axis=1) / count
    return sim - mean[:, None] >= threshold


def _self_as_max_peer(sim: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``sim`` with ``S_ii`` replaced by the largest kept peer similarity (1 if none or <= 0)."""
    n = sim.shape[0]
    off = kept & ~np.eye(n, dtype=bool)
    best = np.max(np.where(off, sim, -np.inf), axis=1) if n else np.zeros(0)
    best = np.where(np.isfinite(best) & (best > 0), best, 1.0)
    out = sim.copy()
    np.fill_diagonal(out, best)
    return out


def personalized_weights(
    s: np.ndarray,
    *,
    threshold: float | None = None,
    clip_negative: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    relative_threshold: bool = False,
    self_similarity: str = "one",
) -> np.ndarray:
    """FedBip personalized weights from a similarity matrix ``s`` ``(N, N)``: ``(N, N)`` float64.

    With every option off this is the paper rule ``p_ik = S_ik / sum_j S_ij`` (self included,
    ``S_ii`` treated as 1; negative similarities give negative weights).

    Args:
        threshold: clients with ``S_ik < threshold`` get weight 0 (self always kept).
        clip_negative: clients with ``S_ik < 0`` get weight 0 (same as ``threshold=0`` for
            the others).
        temperature: ``softmax(S_ik / T)`` over the kept entries instead of linear
            normalization.
        top_k: keep self plus the ``top_k - 1`` most similar kept others (ties at the cut-off
            all kept); ``top_k=1`` is local training.
        relative_threshold: apply ``threshold`` to ``S_ik - mean_{j != i} S_ij`` (how much more
            similar k is than client i's average peer) instead of ``S_ik``; scale-free, so
            ``threshold=0`` keeps the peers that are more similar than average.
        self_similarity: ``"one"`` (paper: ``S_ii = 1``) or ``"max-peer"``: ``S_ii`` = the
            largest similarity among the kept peers, so a client weighs itself like its most
            similar peer instead of dominating when all cosines are small (no kept peer: 1).

    A row whose normalizer is non-finite or below 1e-12 in magnitude becomes the identity row.
    """
    validate_weight_options(threshold=threshold, temperature=temperature, top_k=top_k)
    SELF_SIMILARITY_CHECK("self_similarity", self_similarity)
    sim = _square(s).copy()
    np.fill_diagonal(sim, 1.0)
    kept = ~np.isnan(sim)
    if threshold is not None:
        kept &= _thresholded(sim, float(threshold), relative_threshold)
    if clip_negative:
        kept &= sim >= 0.0
    np.fill_diagonal(kept, True)
    if top_k is not None:
        kept = _top_k_mask(sim, kept, int(top_k))
    if self_similarity == "max-peer":
        sim = _self_as_max_peer(sim, kept)
    if temperature is None:
        w = np.where(kept, sim, 0.0)
    else:
        z = np.where(kept, sim / float(temperature), -np.inf)
        z -= np.max(z, axis=1, keepdims=True)  # self is kept and finite: max is finite
        w = np.exp(z)
    return _normalize_rows(w)


def fedavg_weights(counts: np.ndarray) -> np.ndarray:
    """FedAvg: every row is ``counts / sum(counts)`` (uniform if the sum is 0). ``(N, N)``."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    if c.size == 0:
        return np.zeros((0, 0))
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("counts must be finite and non-negative")
    total = c.sum()
    row = c / total if total > 0 else np.full(c.size, 1.0 / c.size)
    return np.tile(row, (c.size, 1))


def local_weights(n: int) -> np.ndarray:
    """No federation: the ``(n, n)`` identity."""
    return np.eye(int(n))


def fedamp_weights(models: np.ndarray, *, sigma: float, alpha_k: float) -> np.ndarray:
    """FedAMP attention weights (as in PFLlib's ``serverAMP``) on models ``(N, D)``: ``(N, N)``.

    For ``j != i``: ``xi_ij = alpha_k * exp(-||w_i - w_j||² / sigma) / sigma`` and
    ``xi_ii = 1 - sum_{j != i} xi_ij``. Squared distances come from one Gram product of the
    mean-centered models (``|a|² + |b|² - 2ab``, clipped at 0; centering leaves distances
    unchanged and avoids cancellation). If ``xi_ii`` would be negative, the off-diagonal entries
    of that row are rescaled to sum to 1 and ``xi_ii = 0``.
    """
    m = np.asarray(models)
    if m.ndim != 2:
        raise ValueError(f"models must be 2-D (N, D), got shape {m.shape}")
    x = m - m.mean(axis=0, dtype=np.float64).astype(m.dtype)
    return fedamp_from_gram(np.asarray(x @ x.T, dtype=np.float64), sigma=sigma, alpha_k=alpha_k)


def fedamp_from_gram(gram: np.ndarray, *, sigma: float, alpha_k: float) -> np.ndarray:
    """:func:`fedamp_weights` from the ``(N, N)`` Gram matrix of the centered models."""
    sigma, alpha_k = POSITIVE("sigma", sigma), NONNEGATIVE("alpha_k", alpha_k)
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[0]
    sq = np.diagonal(g)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    xi = alpha_k * np.exp(-dist2 / sigma) / sigma
    np.fill_diagonal(xi, 0.0)
    off = xi.sum(axis=1)
    over = off > 1.0
    xi[over] /= off[over][:, None]
    xi[np.arange(n), np.arange(n)] = np.where(over, 0.0, 1.0 - off)
    return xi


def oracle_weights(groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FedAvg inside each true group: ``(N, N)`` float64, block structure by ``groups`` ``(N,)``.

    ``w_ik = counts_k / sum_{j in group(i)} counts_j`` for ``k`` in client ``i``'s group, else 0
    (uniform within the group if its counts sum to 0).
    """
    g = np.asarray(groups).ravel()
    c = np.asarray(counts, dtype=np.float64).ravel()
    if g.shape != c.shape:
        raise ValueError(f"groups and counts differ in length: {g.shape} vs {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("counts must be finite and non-negative")
    same = g[:, None] == g[None, :]
    w = np.where(same, c[None, :], 0.0)
    total = w.sum(axis=1)
    empty = total <= 0
    w[empty] = same[empty].astype(np.float64)
    return w / w.sum(axis=1, keepdims=True)
