"""Validation gate: each client accepts its personalized aggregate only as far as its own
validation split says it helps.

After aggregation, client ``i`` has two candidate models: ``local`` (where its own training
this round took it, ``θ̄ᵢ + τᵢ``) and ``aggregate`` (the personalized mix the server computed).
The gate scores the interpolations ``local + λ (aggregate − local)`` for a few ``λ`` in
``[0, 1]`` on the client's validation split and keeps the largest ``λ`` that is not clearly
worse than the best (within one standard error of its accuracy). ``λ = 1`` is plain FedBip,
``λ = 0`` is local training for that round. When no peer is similar enough to help (e.g. strong
label skew), the client falls back towards its own model instead of being pulled away from it.

With ``gate_memory`` ``m > 0`` the choice reads the client's evidence of earlier rounds too
(:func:`pool_rounds`): each round asks the same question (does this client's aggregate beat its
own training?), so a client whose 20-30 validation examples cannot tell in one round can tell
over several, and the standard error shrinks with the pooled count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np

__all__ = ["GATE_TIES", "check_mixes", "choose_mix", "mix_candidates", "pool_rounds"]

GATE_TIES = ("aggregate", "loss", "loss-se")


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


def choose_mix(scores: Sequence[Mapping[str, float]], mixes: Sequence[float],
               ties: str = "aggregate") -> float:
    """The largest ``λ`` whose validation accuracy is within one standard error of the best.

    ``scores[m]`` holds ``accuracy`` and ``n`` (validation examples) of the candidate for
    ``mixes[m]`` (and ``loss``, its mean validation loss, for ``ties="loss"``). The standard
    error ``sqrt(a (1 − a) / n)`` of the best accuracy ``a`` is the noise of a small validation
    split: a client leaves the aggregate (``λ = 1``) only when its own data says clearly that a
    smaller ``λ`` is better (the one-standard-error rule, biased towards federation). Without
    ``n`` the best accuracy wins, ties to the larger ``λ``. NaN scores never win; with none
    usable (empty validation split) the aggregate is kept.

    ``ties="loss"``: when every candidate within the standard error scores exactly the best
    accuracy (accuracy says nothing between them, e.g. all predict the majority class), the
    one with the lowest validation loss wins instead of the largest ``λ``.

    ``ties="loss-se"``: in that case the one-standard-error rule is applied to the loss
    instead: the largest ``λ`` whose loss is at most the lowest loss plus that candidate's
    standard error ``loss_sd / sqrt(n)`` (``loss_sd`` the per-example standard deviation).
    Without ``loss_sd`` the noise is unknown and the largest ``λ`` is kept, as ``"aggregate"``.
    """
    if len(scores) != len(mixes) or not mixes:
        raise ValueError(f"{len(scores)} scores for {len(mixes)} gate mixes")
    if ties not in GATE_TIES:
        raise ValueError(f"gate_ties must be one of {GATE_TIES}, got {ties!r}")
    acc = [float(s.get("accuracy", math.nan)) for s in scores]
    usable = [m for m, a in enumerate(acc) if a == a]
    if not usable:
        return float(max(mixes))
    best = max(usable, key=lambda m: acc[m])
    n = float(scores[best].get("n", 0) or 0)
    a = acc[best]
    se = math.sqrt(max(a * (1 - a), 0.0) / n) if n > 0 else 0.0
    eligible = [m for m in usable if acc[m] >= a - se - 1e-12]
    if ties != "aggregate" and len(eligible) > 1 and all(acc[m] == a for m in eligible):
        losses = {m: float(scores[m].get("loss", math.nan)) for m in eligible}
        finite = [m for m in eligible if losses[m] == losses[m]]
        if finite:
            low = min(finite, key=lambda m: (losses[m], -mixes[m]))
            margin = 0.0 if ties == "loss" else _loss_se(scores[low])
            if margin == margin:  # NaN: the loss's noise is unknown, keep the largest λ
                return float(max(mixes[m] for m in finite if losses[m] <= losses[low] + margin))
    return float(max(mixes[m] for m in eligible))


def _loss_se(score: Mapping[str, float]) -> float:
    """Standard error ``loss_sd / sqrt(n)`` of a candidate's mean loss (NaN when unknown)."""
    sd, n = float(score.get("loss_sd", math.nan)), float(score.get("n", 0) or 0)
    return sd / math.sqrt(n) if sd == sd and n > 0 else math.nan


def pool_rounds(rounds: Sequence[Sequence[Mapping[str, float]]],
                memory: float) -> list[dict[str, float]]:
    """One client's gate scores pooled over its gated rounds, oldest first.

    ``rounds[t][m]`` holds ``accuracy`` and ``n`` of mix ``m`` in the client's ``t``-th gated
    round (every round scores the same ``M`` mixes). Round ``t`` of ``T`` weighs
    ``w_t = memory^(T-1-t)``: the pooled accuracy is ``Σ w_t n_t a_t / Σ w_t n_t`` and the
    pooled ``n`` is ``Σ w_t n_t`` (the count that sets the standard error in
    :func:`choose_mix`); ``loss`` (when scored) is pooled like the accuracy and ``loss_sd``
    from the pooled second moment. ``memory`` 0
    returns the last round's scores; NaN accuracies are left out of their round.
    """
    if not rounds:
        raise ValueError("pool_rounds needs at least one round")
    width = len(rounds[-1])
    if any(len(r) != width for r in rounds):
        raise ValueError(f"every round must score the same {width} mixes")
    if memory <= 0:
        return [dict(s) for s in rounds[-1]]
    out = []
    for m in range(width):
        total = correct = lossed = loss = second = 0.0
        spread = True  # every round with a loss also knew its spread
        for age, scores in enumerate(reversed(rounds)):
            a, n = float(scores[m].get("accuracy", math.nan)), float(scores[m].get("n", 0) or 0)
            if a == a and n > 0:
                w = memory ** age
                total += w * n
                correct += w * n * a
                x = float(scores[m].get("loss", math.nan))
                sd = float(scores[m].get("loss_sd", math.nan))
                if x == x:
                    lossed += w * n
                    loss += w * n * x
                    spread = spread and sd == sd
                    second += w * n * (sd * sd + x * x)
        pooled = {"accuracy": correct / total if total > 0 else math.nan, "n": total}
        if lossed > 0:
            pooled["loss"] = loss / lossed
        if lossed > 0 and spread:
            pooled["loss_sd"] = math.sqrt(max(second / lossed - pooled["loss"] ** 2, 0.0))
        out.append(pooled)
    return out
