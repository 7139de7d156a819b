"""Strategy wrappers: each transforms the round's task vectors, then delegates to ``inner``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from .aggregate import clip_rows
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

    The noise generator is seeded once with ``seed`` and advances on every call.
    """

    inner: Strategy
    clip: float
    noise_multiplier: float
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)
    name: ClassVar[str] = "gaussian-noise"

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip", POSITIVE("clip", self.clip))
        object.__setattr__(self, "noise_multiplier",
                           NONNEGATIVE("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "_rng", np.random.default_rng(self.seed))

    @property
    def client_options(self) -> ClientOptions:
        return self.inner.client_options

    def privatize(self, inp: AggregationInput) -> AggregationInput:
        """``inp`` with each task vector clipped and noised (draws the next noise sample):
        everything computed from the result (aggregates, similarity, gate candidates) then
        derives from noised updates only."""
        deltas = clip_rows(inp.deltas, self.clip)
        std = self.noise_multiplier * self.clip
        noisy = self._rng.standard_normal(deltas.shape, dtype=np.float32)
        noisy *= np.float32(std)
        noisy += deltas
        return replace(inp, deltas=noisy)

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return self.inner.aggregate(self.privatize(inp))
