"""FedAWA (Shi et al., CVPR 2025): global aggregation weights optimized on client vectors.

Client vectors ``τₖ = θₖ − θ_g`` (``θ_g``: the global model the round started from); the
weights are ``p = softmax(T)`` of learnable logits ``T`` (one per client, kept across rounds,
first set to the clients' example shares ``nₖ / Σ n``), and a few optimizer steps on

    ``L(T) = Σₖ pₖ C(θ_g, θₖ) + Σₖ pₖ ‖τₖ − Σⱼ pⱼ τⱼ‖₂``

with ``C`` the cosine distance ``1 − cos`` (or the mean squared difference, ``"euc"``) move
``T``. The new global model is ``γ Σₖ pₖ θₖ``. As in the authors' code (``server_funct.py``):
a fresh optimizer each round (Adam, lr 1e-3, betas (0.5, 0.999); or SGD, lr 1e-2, momentum
0.9, weight decay 5e-4), and the weights applied are those of the last step's forward pass
(before its update), the updated logits being carried to the next round.

Everything after one pass over the ``(N, D)`` matrices works on ``N``-sized quantities: the
Gram matrix of the (centered) client vectors gives every distance and gradient exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AWAPartial", "AWAStats", "awa_gradient", "awa_loss", "awa_partial", "awa_stats",
           "optimize_logits", "softmax"]

_BLOCK_ELEMENTS = 1 << 22
_COS_EPS = 1e-8  # torch.nn.CosineSimilarity's eps


@dataclass(frozen=True)
class AWAStats:
    """What the FedAWA objective needs from ``N`` client models.

    Attributes:
        gram: ``(N, N)`` float64 Gram matrix of ``θₖ − c`` for a fixed center ``c`` (the
            client vectors up to a common shift, which leaves ``L`` and its gradient unchanged).
        cost: ``(N,)`` float64 ``C(θ_g, θₖ)``.
    """

    gram: np.ndarray
    cost: np.ndarray


def softmax(t: np.ndarray) -> np.ndarray:
    """``softmax`` of ``(N,)`` logits, float64."""
    z = np.exp(np.asarray(t, dtype=np.float64) - np.max(t))
    return z / z.sum()


@dataclass(frozen=True)
class AWAPartial:
    """The additive sums behind :class:`AWAStats` over a column block: ``gram`` ``(N, N)``
    of ``θ`` minus its per-column mean, ``dot_g``, ``sq_k``, ``sq_diff`` ``(N,)`` (``θₖ·θ_g``,
    ``‖θₖ‖²``, ``‖θₖ − θ_g‖²``), ``sq_g`` (``‖θ_g‖²``) and the block's ``d`` columns."""

    gram: np.ndarray
    dot_g: np.ndarray
    sq_k: np.ndarray
    sq_diff: np.ndarray
    sq_g: float
    d: int

    @classmethod
    def combine(cls, parts: list[AWAPartial]) -> AWAPartial:
        """The sums over several blocks (added in block order)."""
        gram, dot_g = parts[0].gram.copy(), parts[0].dot_g.copy()
        sq_k, sq_diff = parts[0].sq_k.copy(), parts[0].sq_diff.copy()
        for p in parts[1:]:
            gram += p.gram
            dot_g += p.dot_g
            sq_k += p.sq_k
            sq_diff += p.sq_diff
        return cls(gram, dot_g, sq_k, sq_diff, float(sum(p.sq_g for p in parts)),
                   int(sum(p.d for p in parts)))

    def finish(self, distance: str = "cos") -> AWAStats:
        """The :class:`AWAStats` of the whole adapter from its combined sums."""
        if distance == "cos":
            denom = (np.maximum(np.sqrt(self.sq_k), _COS_EPS)
                     * max(np.sqrt(self.sq_g), _COS_EPS))
            cost = 1.0 - self.dot_g / denom
        elif distance == "euc":
            cost = self.sq_diff / max(1, self.d)
        else:
            raise ValueError(f"unknown FedAWA distance {distance!r} (known: cos, euc)")
        return AWAStats(gram=self.gram, cost=cost)


def awa_partial(theta: np.ndarray, global_: np.ndarray) -> AWAPartial:
    """:class:`AWAPartial` of client models ``theta`` ``(N, D_b)`` around ``global_``
    ``(D_b,)``, one float64 pass over column blocks."""
    n, d = theta.shape
    center = theta.mean(axis=0, dtype=np.float64)
    gram = np.zeros((n, n))
    dot_g, sq_k, sq_diff = np.zeros(n), np.zeros(n), np.zeros(n)
    sq_g = 0.0
    step = max(1, _BLOCK_ELEMENTS // max(1, n))
    for c0 in range(0, d, step):
        cs = slice(c0, min(d, c0 + step))
        x = theta[:, cs].astype(np.float64)
        g = np.asarray(global_[cs], dtype=np.float64)
        z = x - center[cs]
        gram += z @ z.T
        dot_g += x @ g
        sq_k += np.einsum("ij,ij->i", x, x)
        sq_g += float(g @ g)
        diff = x - g
        sq_diff += np.einsum("ij,ij->i", diff, diff)
    return AWAPartial(gram, dot_g, sq_k, sq_diff, sq_g, d)


def awa_stats(theta: np.ndarray, global_: np.ndarray, distance: str = "cos") -> AWAStats:
    """:class:`AWAStats` of client models ``theta`` ``(N, D)`` around ``global_`` ``(D,)``."""
    return awa_partial(theta, global_).finish(distance)


def _distances(p: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d, Gp)``: ``dₘ = ‖τₘ − Σⱼ pⱼ τⱼ‖`` ``(N,)`` and ``G p`` ``(N,)``."""
    gp = gram @ p
    sq = np.diagonal(gram) - 2.0 * gp + float(p @ gp)
    return np.sqrt(np.maximum(sq, 0.0)), gp


def awa_loss(logits: np.ndarray, stats: AWAStats) -> float:
    """``L(T)`` (module docstring) at logits ``T`` ``(N,)``."""
    p = softmax(logits)
    d, _ = _distances(p, stats.gram)
    return float(p @ stats.cost + p @ d)


def awa_gradient(logits: np.ndarray, stats: AWAStats) -> np.ndarray:
    """``∂L/∂T`` ``(N,)`` float64, exact: ``∂L/∂pₖ = Cₖ + dₖ − Σₘ (pₘ/dₘ)(τₘ − τ̄)·τₖ`` (a
    zero distance contributes 0, as torch's norm gradient does), through the softmax."""
    p = softmax(logits)
    d, gp = _distances(p, stats.gram)
    inv = np.divide(p, d, out=np.zeros_like(p), where=d > 0)
    # Σₘ (pₘ/dₘ) (τₘ − τ̄)·τₖ = Σₘ invₘ (G[m, k] − (Gp)[k])
    cross = stats.gram.T @ inv - inv.sum() * gp
    g_p = stats.cost + d - cross
    return p * (g_p - float(p @ g_p))


def optimize_logits(
    logits: np.ndarray,
    stats: AWAStats,
    *,
    steps: int,
    optimizer: str,
    lr: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` steps of a fresh optimizer on ``L`` from ``logits`` ``(N,)``.

    Returns ``(weights, logits')``: the softmax of the last step's forward pass (what the
    authors' code aggregates with) and the logits after the last update (carried over).
    ``optimizer``: ``"adam"`` (torch Adam, betas (0.5, 0.999), eps 1e-8) or ``"sgd"`` (torch
    SGD, momentum 0.9, weight decay 5e-4).
    """
    t = np.asarray(logits, dtype=np.float64).copy()
    m, v = np.zeros_like(t), np.zeros_like(t)
    buf: np.ndarray | None = None
    used = softmax(t)
    for k in range(1, steps + 1):
        used = softmax(t)
        g = awa_gradient(t, stats)
        if optimizer == "adam":
            b1, b2 = 0.5, 0.999
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            t = t - lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + 1e-8)
        elif optimizer == "sgd":
            g = g + 5e-4 * t
            buf = g if buf is None else 0.9 * buf + g
            t = t - lr * buf
        else:
            raise ValueError(f"unknown FedAWA optimizer {optimizer!r} (known: adam, sgd)")
    return used, t
