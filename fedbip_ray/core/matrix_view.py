"""Views of large (N, N) similarity and weight matrices that stay readable and small at any N:
an order that puts similar clients side by side, and block means over at most C x C cells.
Pure numpy; inputs (N, N), outputs float32 / int64."""

from __future__ import annotations

import numpy as np

__all__ = ["VIEW_CELLS", "block_mean", "chain_order", "cluster_order"]

VIEW_CELLS = 64  # a block view has at most VIEW_CELLS x VIEW_CELLS cells


def cluster_order(matrix: np.ndarray, seeds: int = VIEW_CELLS) -> np.ndarray:
    """(N,) int64 order that puts similar rows of (N, N) ``matrix`` next to each other: up to
    ``seeds`` farthest-point seeds, each row assigned to its most similar seed, rows sorted by
    (seed, similarity to it descending). O(N * seeds); NaN counts as dissimilar."""
    m = np.nan_to_num(np.asarray(matrix, dtype=np.float32), nan=-1.0)
    n = len(m)
    chosen = [0]
    best = m[:, 0].copy()
    for _ in range(1, min(seeds, n)):
        nxt = int(np.argmin(best))
        if best[nxt] >= 0.999 or nxt in chosen:
            break
        chosen.append(nxt)
        best = np.maximum(best, m[:, nxt])
    to_seed = m[:, chosen]
    nearest = np.argmax(to_seed, axis=1)
    closeness = to_seed[np.arange(n), nearest]
    rank = np.argsort(chain_order(m[np.ix_(chosen, chosen)]))  # similar seeds side by side
    return np.lexsort((-closeness, rank[nearest])).astype(np.int64)


def chain_order(matrix: np.ndarray) -> np.ndarray:
    """(S,) greedy nearest-neighbour chain through an (S, S) similarity: from row 0, always
    on to the most similar row not visited yet."""
    s = len(matrix)
    order, left = [0], np.ones(s, dtype=bool)
    left[0] = False
    for _ in range(1, s):
        row = np.where(left, matrix[order[-1]], -np.inf)
        nxt = int(np.argmax(row))
        order.append(nxt)
        left[nxt] = False
    return np.asarray(order, dtype=np.int64)


def block_mean(matrix: np.ndarray, cells: int = VIEW_CELLS) -> np.ndarray:
    """(C, C) float32 means of (N, N) ``matrix`` over C = min(N, cells) near-equal blocks of
    consecutive rows and columns (NaN entries left out; an all-NaN block is NaN)."""
    m = np.asarray(matrix, dtype=np.float64)
    n = len(m)
    starts = np.linspace(0, n, min(n, cells) + 1).astype(np.int64)[:-1]
    known = ~np.isnan(m)
    sums = np.add.reduceat(np.add.reduceat(np.where(known, m, 0.0), starts, 0), starts, 1)
    counts = np.add.reduceat(np.add.reduceat(known.astype(np.int64), starts, 0), starts, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
