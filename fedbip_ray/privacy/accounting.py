"""Privacy spent by client-level DP on task vectors, computed with Google's ``dp-accounting``.

Mechanism (applied on the server, see ``GaussianNoiseStrategy``): every accepted task vector is
clipped to L2 norm ``clip_norm`` and gets Gaussian noise of std ``noise_multiplier * clip_norm``
before aggregation. Each round is a Gaussian mechanism of noise multiplier ``z`` (sensitivity
``clip_norm`` under zero-out adjacency: one client's task vector replaced by zero), on a sample
of ``q = clients_per_round / num_clients`` of the clients (accounted as Poisson sampling, the
usual approximation for fixed-size sampling, as in DP-FedAvg). Rounds compose; the RDP
accountant converts the total to ``epsilon`` at ``delta``.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any

# Integer Renyi orders (the fractional ones make dp-accounting warn for sampled Gaussians).
RDP_ORDERS: tuple[float, ...] = tuple(range(2, 129)) + (160.0, 192.0, 256.0, 384.0, 512.0, 1024.0)


@lru_cache(maxsize=4096)
def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` sampled Gaussian rounds (``inf`` without noise).

    Args:
        noise_multiplier: noise std / clip norm (``z`` >= 0).
        sample_rate: fraction of clients sampled per round, in (0, 1].
        rounds: number of rounds that released an aggregate (>= 0).
        delta: target delta in (0, 1).
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    logging.getLogger("absl").setLevel(logging.ERROR)
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            float(sample_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
        ),
        int(rounds),
    )
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(event)
    return float(accountant.get_epsilon(float(delta)))


def privacy_report(clip_norm: float, noise_multiplier: float, delta: float,
                   sample_rate: float, rounds: int) -> dict[str, Any]:
    """What metrics.jsonl records per round: the mechanism and the epsilon spent so far
    (``epsilon`` is None when it is infinite, i.e. clipping without noise)."""
    eps = dp_epsilon(float(noise_multiplier), float(sample_rate), int(rounds), float(delta))
    return {
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": float(delta),
        "noise_multiplier": float(noise_multiplier),
        "clip_norm": float(clip_norm),
        "sample_rate": float(sample_rate),
        "rounds_accounted": int(rounds),
        "accountant": "rdp",
    }
