"""Exact aggregation of LoRA modules in ``ΔW = B A`` space, brought back to rank ``r``.

Averaging the factors separately is inexact, ``(Σ p B)(Σ p A) ≠ Σ p B A`` (FedEx-LoRA,
FLoRA). Here each client's LoRA module gets the task-vector rule applied to ``ΔW``,

    ``T_i = B̄ᵢ Āᵢ + Σₖ wᵢₖ (Bₖ Aₖ − B̄ₖ Āₖ)``

(``(B̄ₖ, Āₖ)``: the state participant ``k`` received, ``(Bₖ, Aₖ)``: its trained factors; when
every participant received the same state and rows of ``w`` sum to 1 this is
``Σₖ wᵢₖ Bₖ Aₖ``), truncated to the adapter's rank ``r`` by an SVD and split back into factors.
``T_i`` is never formed: its factors are stacked, ``[c_j B_j] (d_out × J r)`` and
``[A_j] (J r × d_in)``, both are QR-factorized once per module, and only the small core
``R_B diag(c) R_Aᵀ`` (at most ``min(d_out, J r) × min(d_in, J r)``) is decomposed per client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .similarity import lora_role
from .taskvector import Layout, module_key

__all__ = [
    "LoraPair",
    "balanced_split",
    "exact_lora_states",
    "lora_factor_pairs",
    "lowrank_sum",
]

_DROP = 1e-9  # state coefficients below this (for every client) are left out of the pool


@dataclass(frozen=True)
class LoraPair:
    """One LoRA module: the slices of its ``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)`` factors."""

    key: str
    a: slice
    b: slice
    r: int
    d_in: int
    d_out: int


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``shape`` as 2-D when its trailing dimensions are all 1 (1x1 conv LoRA), else None."""
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        return None
    return shape[0], shape[1]


def lora_factor_pairs(layout: Layout) -> list[LoraPair]:
    """The LoRA modules of ``layout`` with one ``A`` ``(r, d_in)`` and one ``B`` ``(d_out, r)``
    factor (peft names; 1x1 conv factors count as matrices), in layout order."""
    found: dict[str, dict[str, list[str]]] = {}
    for name in layout.names:
        role = lora_role(name)
        if role is not None:
            found.setdefault(module_key(name), {"A": [], "B": []})[role].append(name)
    pairs = []
    for key, roles in found.items():
        if len(roles["A"]) != 1 or len(roles["B"]) != 1:
            continue
        a, b = roles["A"][0], roles["B"][0]
        sa, sb = _matrix_shape(layout.shape(a)), _matrix_shape(layout.shape(b))
        if sa is None or sb is None or sa[0] != sb[1]:
            continue
        pairs.append(LoraPair(key, layout.index(a), layout.index(b), sa[0], sa[1], sb[0]))
    return pairs


def balanced_split(
    u: np.ndarray,
    s: np.ndarray,
    vt: np.ndarray,
    rank: int,
    ref_b: np.ndarray | None = None,
    ref_a: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``B' (d_out, rank)``, ``A' (rank, d_in)`` of the rank-``rank`` truncation of
    ``u diag(s) vt`` (``s`` descending).

    ``B' = U_r S_r^{1/2} R`` and ``A' = Rᵀ S_r^{1/2} V_rᵀ``: balanced (``B'ᵀB' = A'A'ᵀ``) for
    any orthogonal ``R``; with references ``R`` is the orthogonal Procrustes solution that
    brings ``(B', A')`` closest to ``(ref_b, ref_a)`` (so that factor-space mixes and the next
    round's task vectors stay in the client's own basis), else ``R = I``. When the sum has
    numerical rank ``k < rank``, the last ``rank − k`` columns of ``B'`` are 0 and the
    matching rows of ``A'`` are ``ref_a``'s (zeros without a reference): ``B'A'`` is the same.
    """
    k = int(np.count_nonzero(s[:rank] > (s[0] if s.size else 0.0) * 1e-12)) if s.size else 0
    root = np.sqrt(s[:k])
    y = u[:, :k] * root
    x = root[:, None] * vt[:k]
    if k == rank and ref_b is not None and ref_a is not None:
        p, _, qt = np.linalg.svd(y.T @ ref_b + x @ ref_a.T)
        rot = p @ qt
        return y @ rot, rot.T @ x
    b = np.zeros((u.shape[0], rank))
    a = np.zeros((rank, vt.shape[1])) if ref_a is None else np.array(ref_a, dtype=np.float64)
    b[:, :k], a[:k] = y, x
    return b, a


def _pooled_qr(bs: np.ndarray, as_: np.ndarray) -> tuple[np.ndarray, ...]:
    """QR of the stacked factors ``[B_1 | ... | B_J]`` ``(d_out, J r)`` and
    ``[A_1ᵀ | ... | A_Jᵀ]`` ``(d_in, J r)`` from ``bs (J, d_out, r)``, ``as_ (J, r, d_in)``."""
    j, d_out, r = bs.shape
    qb, rb = np.linalg.qr(bs.transpose(1, 0, 2).reshape(d_out, j * r))
    qa, ra = np.linalg.qr(as_.transpose(2, 0, 1).reshape(as_.shape[2], j * r))
    return qb, rb, qa, ra


def _core_svd(pool: tuple[np.ndarray, ...], coeffs: np.ndarray, r: int) -> tuple[np.ndarray, ...]:
    """Thin SVD ``(U, s, Vᵀ)`` of ``Σ_j coeffs_j B_j A_j`` from the pooled QR, via the core
    ``R_B diag(coeffs ⊗ 1_r) R_Aᵀ``."""
    qb, rb, qa, ra = pool
    core = (rb * np.repeat(coeffs, r)[None, :]) @ ra.T
    uc, s, vct = np.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, vct @ qa.T


def lowrank_sum(
    bs: np.ndarray, as_: np.ndarray, coeffs: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors ``B' (d_out, rank)``, ``A' (rank, d_in)`` float64 of
    ``Σ_j coeffs_j B_j A_j`` (``bs (J, d_out, r)``, ``as_ (J, r, d_in)``, ``coeffs (J,)``)
    without forming a ``d_out × d_in`` matrix; balanced split with ``R = I``."""
    b64, a64 = np.asarray(bs, dtype=np.float64), np.asarray(as_, dtype=np.float64)
    u, s, vt = _core_svd(_pooled_qr(b64, a64), np.asarray(coeffs, np.float64), b64.shape[2])
    return balanced_split(u, s, vt, rank)


def _state_terms(
    state_b: np.ndarray, state_a: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct received states of one module and their coefficients ``(N, U)`` in ``T_i``:
    ``[state(i) = u] − Σ_{k: state(k) = u} wᵢₖ``; columns that are ~0 for every client are
    dropped (all zero when every participant received the same state)."""
    n = state_b.shape[0]
    flat = np.concatenate([state_b.reshape(n, -1), state_a.reshape(n, -1)], axis=1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    onehot = np.zeros((n, first.size))
    onehot[np.arange(n), inverse.ravel()] = 1.0
    coeffs = onehot - weights @ onehot
    keep = np.abs(coeffs).max(axis=0) > _DROP
    return state_b[first[keep]], state_a[first[keep]], coeffs[:, keep]


def _exact_module(
    theta_b: np.ndarray,
    theta_a: np.ndarray,
    state_b: np.ndarray,
    state_a: np.ndarray,
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """New factors ``(N, d_out, r)``, ``(N, r, d_in)`` of one LoRA module for every client:
    the balanced rank-``r`` truncation of ``T_i``, aligned to client ``i``'s trained factors."""
    n, _, r = theta_b.shape
    sb, sa, sc = _state_terms(state_b, state_a, weights)
    pool = _pooled_qr(np.concatenate([theta_b, sb]), np.concatenate([theta_a, sa]))
    coeffs = np.concatenate([weights, sc], axis=1)
    new_b, new_a = np.empty_like(theta_b), np.empty_like(theta_a)
    for i in range(n):
        u, s, vt = _core_svd(pool, coeffs[i], r)
        new_b[i], new_a[i] = balanced_split(u, s, vt, r, theta_b[i], theta_a[i])
    return new_b, new_a


def exact_lora_states(
    out: np.ndarray,
    states: np.ndarray,
    deltas: np.ndarray,
    layout: Layout,
    weights_for: Callable[[str], np.ndarray],
) -> np.ndarray:
    """``out`` ``(N, D)`` float32 with every LoRA module's factors replaced by the exact
    ``ΔW``-space aggregate (see the module docstring); other columns are left as they are.

    Args:
        out: ``(N, D)`` float32 next states from the factor-space rule (modified in place).
        states: ``(N, D)`` received states; ``deltas``: ``(N, D)`` task vectors.
        layout: layout of ``D``.
        weights_for: module key -> the ``(N, N)`` weights that module is aggregated with.
    """
    n = states.shape[0]
    for pair in lora_factor_pairs(layout):
        shp_b, shp_a = (n, pair.d_out, pair.r), (n, pair.r, pair.d_in)
        sb = states[:, pair.b].astype(np.float64).reshape(shp_b)
        sa = states[:, pair.a].astype(np.float64).reshape(shp_a)
        tb = sb + deltas[:, pair.b].astype(np.float64).reshape(shp_b)
        ta = sa + deltas[:, pair.a].astype(np.float64).reshape(shp_a)
        w = np.asarray(weights_for(pair.key), dtype=np.float64)
        new_b, new_a = _exact_module(tb, ta, sb, sa, w)
        out[:, pair.b] = new_b.reshape(n, -1)
        out[:, pair.a] = new_a.reshape(n, -1)
    return out
