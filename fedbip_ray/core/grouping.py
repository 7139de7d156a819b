"""How well a similarity (or weight) matrix recovers the true client groups: adjusted Rand
index of a clustering of the similarity, in-group weight share, in/cross-group similarity.
Diagnostics for benchmarks and runs whose groups are known; inputs (N, N) float64."""

from __future__ import annotations

import numpy as np

__all__ = ["adjusted_rand_index", "cluster_similarity", "group_recovery"]


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index of two labelings ``(N,)`` (1.0 = identical partitions).

    Same definition as scikit-learn's ``adjusted_rand_score`` (pair-confusion form).
    """
    t = np.asarray(labels_true).ravel()
    p = np.asarray(labels_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"label arrays differ in length: {t.shape} vs {p.shape}")
    n = t.size
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    cont = np.zeros((ti.max(initial=0) + 1, pi.max(initial=0) + 1), dtype=np.int64)
    np.add.at(cont, (ti, pi), 1)
    n_c = cont.sum(axis=1)
    n_k = cont.sum(axis=0)
    sum_sq = int((cont**2).sum())
    tp = sum_sq - n
    fp = int((cont @ n_k).sum()) - sum_sq
    fn = int((cont.T @ n_c).sum()) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def _average_linkage_numpy(dist: np.ndarray, n_clusters: int) -> np.ndarray:
    """Average-linkage agglomerative clustering of a ``(N, N)`` distance matrix (numpy only)."""
    n = dist.shape[0]
    d = np.array(dist, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    sizes = np.ones(n)
    labels = np.arange(n)
    for _ in range(n - n_clusters):
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        i, j = min(i, j), max(i, j)
        merged = (sizes[i] * d[i] + sizes[j] * d[j]) / (sizes[i] + sizes[j])
        d[i, :] = merged
        d[:, i] = merged
        d[i, i] = np.inf
        d[j, :] = np.inf
        d[:, j] = np.inf
        sizes[i] += sizes[j]
        labels[labels == j] = i
    return np.unique(labels, return_inverse=True)[1]


def cluster_similarity(similarity: np.ndarray, n_clusters: int) -> np.ndarray:
    """Cluster clients by average linkage on ``1 - S``: ``(N,)`` int64 labels.

    Uses scipy's hierarchy when importable, else an equivalent numpy implementation.
    """
    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    k = int(min(max(n_clusters, 1), n))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    dist = 1.0 - 0.5 * (s + s.T)
    dist = np.nan_to_num(dist, nan=2.0, posinf=2.0, neginf=2.0)
    np.clip(dist, 0.0, 2.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    if n == 1 or k == n:
        return np.arange(n, dtype=np.int64)
    try:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform
    except ImportError:  # pragma: no cover - scipy is normally installed
        return _average_linkage_numpy(dist, k).astype(np.int64)
    z = linkage(squareform(dist, checks=False), method="average")
    return (fcluster(z, t=k, criterion="maxclust") - 1).astype(np.int64)


def group_recovery(
    similarity: np.ndarray, weights: np.ndarray, groups: np.ndarray
) -> dict[str, float]:
    """How well a similarity/weight matrix recovers the true client groups.

    Args:
        similarity: ``(N, N)`` similarity.
        weights: ``(N, N)`` aggregation weights (rows sum to 1).
        groups: ``(N,)`` int true group of each client.

    Returns:
        ``in_group_weight_share``: mean over rows of the weight on same-group clients (self
        included); ``in_group_similarity`` / ``cross_group_similarity``: mean off-diagonal
        similarity between same-group / different-group clients (NaN when there are no such
        pairs); ``adjusted_rand_index``: ARI between the true groups and an average-linkage
        clustering of the similarity into as many clusters as there are groups.
    """
    s = np.asarray(similarity, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(groups).ravel()
    n = g.size
    if s.shape != (n, n) or w.shape != (n, n):
        raise ValueError(f"need (N, N) matrices for N={n}, got {s.shape} and {w.shape}")
    same = g[:, None] == g[None, :]
    off = ~np.eye(n, dtype=bool)
    in_pairs = same & off
    cross_pairs = ~same
    labels = cluster_similarity(s, len(np.unique(g)))
    return {
        "in_group_weight_share": float((w * same).sum(axis=1).mean()) if n else float("nan"),
        "in_group_similarity": float(s[in_pairs].mean()) if in_pairs.any() else float("nan"),
        "cross_group_similarity": (
            float(s[cross_pairs].mean()) if cross_pairs.any() else float("nan")
        ),
        "adjusted_rand_index": adjusted_rand_index(g, labels),
    }
