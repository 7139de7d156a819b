"""Validation gate: each client accepts its personalized aggregate only as far as its own
validation split says it helps.

After aggregation, client ``i`` has two candidate models: ``local`` (where its own training
this round took it, ``θ̄ᵢ + τᵢ``) and ``aggregate`` (the personalized mix the server computed).
The gate scores the interpolations ``local + λ (aggregate − local)`` for a few ``λ`` in
``[0, 1]`` on the client's validation split and keeps the largest ``λ`` that is not clearly
worse than the best (within one standard error of its accuracy). ``λ = 1`` is plain FedBip,
``λ = 0`` is local training for that round. When no peer is similar enough to help (e.g. strong
label skew), the client falls back towards its own model instead of being pulled away from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np

__all__ = ["check_mixes", "choose_mix", "mix_candidates"]


def check_mixes(mixes: Sequence[float] | None) -> tuple[float, ...]:
    """Validated gate mixes: distinct numbers in ``[0, 1]``, sorted descending (empty = off)."""
    if mixes is None:
        return ()
    if isinstance(mixes, (str, bytes)) or not isinstance(mixes, Sequence):
        raise ValueError(f"gate must be a list of numbers in [0, 1], got {mixes!r}")
    out = []
    for m in mixes:
        if (isinstance(m, bool) or not isinstance(m, Real) or not math.isfinite(m)
                or not 0 <= m <= 1):
            raise ValueError(f"gate entries must be numbers in [0, 1], got {m!r}")
        out.append(float(m))
    if len(set(out)) != len(out):
        raise ValueError(f"gate entries must be distinct, got {list(mixes)!r}")
    return tuple(sorted(out, reverse=True))


def mix_candidates(local: np.ndarray, aggregate: np.ndarray, mixes: Sequence[float]) -> np.ndarray:
    """Candidate states ``local + λ (aggregate − local)``.

    Args:
        local: ``(D,)`` the client's state after its own training this round.
        aggregate: ``(D,)`` its personalized aggregate.
        mixes: ``M`` values of ``λ``.

    Returns:
        ``(M, D)`` float32, row ``m`` for ``mixes[m]``.
    """
    lo = np.asarray(local, dtype=np.float32)
    ag = np.asarray(aggregate, dtype=np.float32)
    if lo.ndim != 1 or lo.shape != ag.shape:
        raise ValueError(f"local {lo.shape} and aggregate {ag.shape} must be equal (D,) vectors")
    lam = np.asarray(mixes, dtype=np.float32)[:, None]
    return lo[None, :] + lam * (ag - lo)[None, :]


def choose_mix(scores: Sequence[Mapping[str, float]], mixes: Sequence[float]) -> float:
    """The largest ``λ`` whose validation accuracy is within one standard error of the best.

    ``scores[m]`` holds ``accuracy`` and ``n`` (validation examples) of the candidate for
    ``mixes[m]``. The standard error ``sqrt(a (1 − a) / n)`` of the best accuracy ``a`` is the
    noise of a small validation split: a client leaves the aggregate (``λ = 1``) only when its
    own data says clearly that a smaller ``λ`` is better (the one-standard-error rule, biased
    towards federation). Without ``n`` the best accuracy wins, ties to the larger ``λ``. NaN
    scores never win; with none usable (empty validation split) the aggregate is kept.
    """
    if len(scores) != len(mixes) or not mixes:
        raise ValueError(f"{len(scores)} scores for {len(mixes)} gate mixes")
    acc = [float(s.get("accuracy", math.nan)) for s in scores]
    usable = [m for m, a in enumerate(acc) if a == a]
    if not usable:
        return float(max(mixes))
    best = max(usable, key=lambda m: acc[m])
    n = float(scores[best].get("n", 0) or 0)
    a = acc[best]
    se = math.sqrt(max(a * (1 - a), 0.0) / n) if n > 0 else 0.0
    return float(max(mixes[m] for m in usable if acc[m] >= a - se - 1e-12))
