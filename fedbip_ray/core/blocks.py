"""The parameter axis in column blocks, for a server split into shards.

A shard holds one contiguous block of the ``D`` columns for every client, split at module
boundaries (:func:`split_layout`), so per-module similarity, FedBip-L's per-layer weights and
the LoRA ``B A`` products stay inside one block. A strategy's statistics of the blocks
combine (:func:`combine`) into those of the whole adapter; every quantity that depends on the
whole vector (norms, DP noise) is computed here so that its value does not depend on how many
blocks there are: norms from per-parameter float64 sums added exactly (``math.fsum``), noise
drawn per fixed chunk of the global column axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .taskvector import Layout, module_key

__all__ = ["NOISE_CHUNK", "Block", "block_noise", "combine", "param_sq_norms", "row_norms",
           "split_layout"]

NOISE_CHUNK = 1 << 16  # columns per noise chunk (one generator per chunk)


@dataclass(frozen=True)
class Block:
    """Columns ``[start, stop)`` of the adapter and their own :class:`Layout`."""

    start: int
    stop: int
    layout: Layout

    @property
    def cols(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def size(self) -> int:
        return self.stop - self.start


def _module_runs(layout: Layout) -> list[tuple[int, int]]:
    """``(first name, end name)`` index ranges of consecutive parameters of one module;
    ValueError when a module's parameters are not consecutive."""
    runs: list[tuple[int, int]] = []
    seen: set[str] = set()
    prev = None
    for i, name in enumerate(layout.names):
        key = module_key(name)
        if key != prev:
            if key in seen:
                raise ValueError(f"module {key!r} is not contiguous in the layout: a sharded "
                                 "server splits at module boundaries")
            seen.add(key)
            runs.append((i, i + 1))
            prev = key
        else:
            runs[-1] = (runs[-1][0], i + 1)
    return runs


def _sub_layout(layout: Layout, first: int, end: int) -> Layout:
    names = layout.names[first:end]
    return Layout.from_shapes({n: layout.shape(n) for n in names})


def split_layout(layout: Layout, k: int) -> list[Block]:
    """``layout`` in ``k`` contiguous blocks of whole modules, as equal in size as module
    boundaries allow (block ``i`` ends at the module boundary nearest ``(i + 1) D / k``).

    Raises ValueError when ``k`` is below 1 or exceeds the number of modules."""
    if k < 1:
        raise ValueError(f"the number of blocks must be >= 1, got {k}")
    runs = _module_runs(layout)
    if k > len(runs):
        raise ValueError(f"{k} server shards but the adapter has {len(runs)} modules: at most "
                         "one shard per module")
    stops = [layout.offsets[e - 1] + math.prod(layout.shapes[e - 1]) for _, e in runs]
    cuts: list[int] = []  # the last run of each block but the last
    for i in range(1, k):
        lo = cuts[-1] + 1 if cuts else 0
        hi = len(runs) - (k - i) - 1  # leave at least one module to every later block
        target = layout.size * i / k
        cuts.append(min(range(lo, hi + 1), key=lambda r: abs(stops[r] - target)))
    blocks, first = [], 0
    for last in [*cuts, len(runs) - 1]:
        a, b = runs[first][0], runs[last][1]
        blocks.append(Block(layout.offsets[a], stops[last], _sub_layout(layout, a, b)))
        first = last + 1
    return blocks


def combine(parts: Sequence[Any]) -> Any:
    """The whole adapter's statistics from its blocks' (in block order): None stays None;
    otherwise the statistics type's own ``combine``."""
    if not parts or parts[0] is None:
        return None
    return type(parts[0]).combine(parts)


def param_sq_norms(vectors: np.ndarray, layout: Layout) -> np.ndarray:
    """``(N, P)`` float64 squared L2 norm of each parameter of each row of ``vectors``
    ``(N, D)`` (or ``(D,)``, giving ``(P,)``)."""
    x = np.asarray(vectors)
    single = x.ndim == 1
    x2 = x[None, :] if single else x
    out = np.empty((x2.shape[0], len(layout.names)), dtype=np.float64)
    for j, name in enumerate(layout.names):
        part = x2[:, layout.index(name)].astype(np.float64)
        out[:, j] = np.einsum("ij,ij->i", part, part)
    return out[0] if single else out


def row_norms(sq: np.ndarray) -> np.ndarray:
    """``(N,)`` L2 norms from per-parameter squared norms ``(N, P)`` (or ``(P,)`` -> ``()``),
    each row added exactly (``math.fsum``): the same whatever the blocks were."""
    s = np.asarray(sq, dtype=np.float64)
    if s.ndim == 1:
        return np.float64(math.sqrt(math.fsum(s.tolist())))
    return np.asarray([math.sqrt(math.fsum(row)) for row in s.tolist()], dtype=np.float64)


def block_noise(seed: int, n: int, start: int, stop: int) -> np.ndarray:
    """``(n, stop - start)`` float32 standard normal noise for columns ``[start, stop)``:
    column chunk ``c`` (``NOISE_CHUNK`` columns) is drawn from its own generator seeded by
    ``(seed, c)``, so any split of the columns draws the same values."""
    out = np.empty((n, stop - start), dtype=np.float32)
    for c in range(start // NOISE_CHUNK, (max(start, stop - 1)) // NOISE_CHUNK + 1):
        c0 = c * NOISE_CHUNK
        lo, hi = max(start, c0), min(stop, c0 + NOISE_CHUNK)
        if hi <= lo:
            continue
        z = np.random.default_rng([seed, c]).standard_normal((n, NOISE_CHUNK), dtype=np.float32)
        out[:, lo - start:hi - start] = z[:, lo - c0:hi - c0]
    return out
