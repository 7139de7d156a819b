"""Strategy wrappers: each transforms the round's task vectors, then delegates to ``inner``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from .aggregate import clip_rows
from .blocks import block_noise, param_sq_norms, row_norms
from .interface import AggregationInput, AggregationResult, ClientOptions, Strategy
from .params import NONNEGATIVE, POSITIVE

__all__ = ["ClippedStrategy", "GaussianNoiseStrategy"]


@dataclass(frozen=True)
class ClippedStrategy:
    """Clip each task vector to L2 norm ``max_norm`` before delegating to ``inner``."""

    inner: Strategy
    max_norm: float
    name: ClassVar[str] = "clipped"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_norm", POSITIVE("max_norm", self.max_norm))

    @property
    def client_options(self) -> ClientOptions:
        return self.inner.client_options

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return self.inner.aggregate(replace(inp, deltas=clip_rows(inp.deltas, self.max_norm)))


@dataclass(frozen=True)
class GaussianNoiseStrategy:
    """Client-level DP: clip each task vector to ``clip``, add ``N(0, (noise_multiplier·clip)²)``.

    Norms and noise are those of a server split in column blocks
    (:func:`~fedbip_ray.core.blocks.row_norms`, :func:`~fedbip_ray.core.blocks.block_noise`):
    ``seed`` determines the noise (the server seeds it per round).
    """

    inner: Strategy
    clip: float
    noise_multiplier: float
    seed: int = 0
    name: ClassVar[str] = "gaussian-noise"

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", POSITIVE("clip", self.clip))
        object.__setattr__(self, "noise_multiplier",
                           NONNEGATIVE("noise_multiplier", self.noise_multiplier))

    @property
    def client_options(self) -> ClientOptions:
        return self.inner.client_options

    def privatize(self, inp: AggregationInput) -> AggregationInput:
        """``inp`` with each task vector clipped and noised: everything computed from the
        result (aggregates, similarity, gate candidates) then derives from noised updates
        only."""
        norms = row_norms(param_sq_norms(inp.deltas, inp.layout))
        scale = np.ones_like(norms)
        over = norms > self.clip
        scale[over] = self.clip / norms[over]
        deltas = inp.deltas * scale.astype(np.float32)[:, None] if over.any() else inp.deltas
        noisy = block_noise(self.seed, inp.n, 0, inp.layout.size)
        noisy *= np.float32(self.noise_multiplier * self.clip)
        noisy += deltas
        return replace(inp, deltas=noisy)

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return self.inner.aggregate(self.privatize(inp))
