"""Cosine similarity between client task vectors.

Every similarity here is computed from a Gram matrix ``G = X Xᵀ`` (one BLAS product over the
stacked ``(N, D)`` matrix, never a loop over client pairs) and then normalized to cosine,
``S_ik = G_ik / sqrt(G_ii G_kk)``. This is exactly the product of the row-normalized matrix with
its transpose, but needs no normalized ``(N, D)`` copy. Centering (subtracting the mean client
vector) is likewise applied to the Gram matrix, ``H G H`` with ``H = I - 11ᵀ/N``, which equals
the Gram matrix of the centered vectors.

Conventions: inputs are ``(N, D)`` float32 (float64 is accepted), outputs are float64; a client
with a zero vector has similarity 0 to every other client and 1 to itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .taskvector import Layout, as_float32, module_key

__all__ = [
    "SCOPES",
    "ModuleGrams",
    "center_gram",
    "cosine_similarity",
    "gram_to_cosine",
    "lora_pairs",
    "lora_role",
    "module_grams",
    "module_similarity",
    "per_module_similarity",
    "select_parameters",
    "similarity_matrix",
    "smooth_similarity",
]

SCOPES: tuple[str, ...] = ("flat", "layer", "modules")

_LORA_ROLES = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
}
# Rows of the (block) Gram computed at once in the LoRA product; bounds temporary memory.
_LORA_BLOCK_ELEMENTS = 1 << 22
# Columns of a plain Gram taken at once: N x block elements (bounds temporaries of sums/bases).
_PLAIN_BLOCK_ELEMENTS = 1 << 24


class SumOfMatrices:
    """``a + b`` for two ``(N, D)`` float32 matrices, formed one column block at a time.

    Lets the similarity functions compare ``θ = θ̄ + τ`` without an ``(N, D)`` copy: they
    only read column slices (``m[:, s]``).
    """

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"summands must be (N, D) of one shape, got {a.shape} and {b.shape}")
        self.a, self.b = a, b
        self.shape = a.shape
        self.dtype = np.result_type(a.dtype, b.dtype)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return self.a[key] + self.b[key]


def _as_matrix(m: Any, name: str = "vectors") -> np.ndarray:
    """``m`` as a 2-D float numpy array (float32/float64 kept, anything else -> float32)."""
    if isinstance(m, SumOfMatrices):
        return m  # type: ignore[return-value]  # read by column slices only
    if hasattr(m, "detach"):
        m = as_float32(m)
    arr = np.asarray(m)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    return arr


def gram_to_cosine(gram: np.ndarray) -> np.ndarray:
    """Normalize a Gram matrix ``(N, N)`` to cosine similarity ``(N, N)`` float64.

    Rows with a zero (or non-finite) diagonal get similarity 0 to others; the diagonal is 1;
    values are clipped to ``[-1, 1]``; the result is exactly symmetric.
    """
    g = np.asarray(gram, dtype=np.float64)
    g = 0.5 * (g + g.T)  # exactly symmetric whatever product produced it
    diag = np.diagonal(g).copy()
    ok = np.isfinite(diag) & (diag > 0.0)
    inv = np.zeros_like(diag)
    inv[ok] = 1.0 / np.sqrt(diag[ok])
    s = g * np.outer(inv, inv)
    s[~ok, :] = 0.0
    s[:, ~ok] = 0.0
    np.clip(s, -1.0, 1.0, out=s)
    np.fill_diagonal(s, 1.0)
    return s


def center_gram(gram: np.ndarray) -> np.ndarray:
    """``H G H`` with ``H = I - 11ᵀ/N``: Gram of the mean-centered vectors. ``(N, N)`` float64."""
    g = np.asarray(gram, dtype=np.float64)
    return g - g.mean(axis=1, keepdims=True) - g.mean(axis=0, keepdims=True) + g.mean()


def cosine_similarity(m: np.ndarray) -> np.ndarray:
    """Pairwise cosine of the rows of ``m`` ``(N, D)``: ``(N, N)`` float64 from one product.

    ``m @ m.T`` is a single BLAS call (SYRK); it is normalized by its diagonal, which equals
    the product of the row-normalized matrix with its transpose without an ``(N, D)`` copy.
    """
    x = _as_matrix(m, "m")
    return gram_to_cosine(x @ x.T)


# --------------------------------------------------------------------------- plans


@dataclass
class _Plan:
    """What to compare inside one module: plain slices and LoRA (A, B) factor pairs."""

    slices: list[slice] = field(default_factory=list)
    pairs: list[tuple[slice, tuple[int, ...], slice, tuple[int, ...]]] = field(default_factory=list)


def select_parameters(layout: Layout, modules: Sequence[str] = ()) -> list[str]:
    """Names of parameters containing any substring of ``modules`` (all if ``modules`` empty).

    Raises ValueError when a non-empty filter matches nothing.
    """
    if isinstance(modules, str):
        modules = (modules,)
    if not modules:
        return list(layout.names)
    names = [n for n in layout.names if any(m in n for m in modules)]
    if not names:
        raise ValueError(
            f"modules filter {tuple(modules)!r} matches no parameter "
            f"(first parameters: {list(layout.names[:3])!r})"
        )
    return names


def lora_role(name: str) -> str | None:
    """``"A"`` / ``"B"`` for a peft LoRA factor parameter name, else None."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts.pop()
    if len(parts) > 1 and parts[-1] == "default":
        parts.pop()
    return _LORA_ROLES.get(parts[-1])


def lora_pairs(layout: Layout, names: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
    """Module key -> ``(lora_A name, lora_B name)`` for modules with exactly one 2-D pair.

    A must be ``(r, in)`` and B ``(out, r)`` with the same ``r`` (peft ``lora_A``/``lora_B`` and
    ``lora_embedding_A``/``lora_embedding_B``). Other layouts (conv LoRA, several adapters in one
    module) are not paired and are compared as plain parameters.
    """
    roles: dict[str, dict[str, list[str]]] = {}
    for name in layout.names if names is None else names:
        role = lora_role(name)
        if role is not None:
            roles.setdefault(module_key(name), {"A": [], "B": []})[role].append(name)
    pairs: dict[str, tuple[str, str]] = {}
    for key, found in roles.items():
        if len(found["A"]) != 1 or len(found["B"]) != 1:
            continue
        a, b = found["A"][0], found["B"][0]
        sa, sb = layout.shape(a), layout.shape(b)
        if len(sa) == 2 and len(sb) == 2 and sa[0] == sb[1]:
            pairs[key] = (a, b)
    return pairs


def _merge_runs(slices: list[slice]) -> list[slice]:
    """Merge adjacent slices (in buffer order) into maximal contiguous runs."""
    runs: list[slice] = []
    for sl in sorted(slices, key=lambda s: s.start):
        if runs and runs[-1].stop == sl.start:
            runs[-1] = slice(runs[-1].start, sl.stop)
        elif sl.stop > sl.start:
            runs.append(sl)
    return runs


def _plans(layout: Layout, names: list[str], lora_product: bool) -> dict[str, _Plan]:
    """Module key -> comparison plan for the selected parameter ``names``."""
    pairs = lora_pairs(layout, names) if lora_product else {}
    paired = {n for ab in pairs.values() for n in ab}
    plans: dict[str, _Plan] = {}
    for name in names:
        key = module_key(name)
        plan = plans.setdefault(key, _Plan())
        if name not in paired:
            plan.slices.append(layout.index(name))
        elif key in pairs and name == pairs[key][0]:
            a, b = pairs[key]
            plan.pairs.append((layout.index(a), layout.shape(a), layout.index(b), layout.shape(b)))
    for plan in plans.values():
        plan.slices = _merge_runs(plan.slices)
    return plans


# --------------------------------------------------------------------------- Gram terms


def _plain_gram(x: np.ndarray, base: np.ndarray | None, slices: list[slice]) -> np.ndarray:
    """Sum over ``slices`` of ``Xs Xsᵀ`` (``Xs = x[:, s] - base[:, s]``): ``(N, N)`` float64.

    Column blocks of at most ``_PLAIN_BLOCK_ELEMENTS / N`` keep temporaries small."""
    n = x.shape[0]
    g = np.zeros((n, n), dtype=np.float64)
    block = max(1, _PLAIN_BLOCK_ELEMENTS // max(1, n))
    views = isinstance(x, np.ndarray) and base is None  # slices are views: no temporaries
    for sl in slices:
        width = sl.stop - sl.start
        step = width if views else block
        for c0 in range(sl.start, sl.stop, max(1, step)):
            cs = slice(c0, min(sl.stop, c0 + step))
            xs = x[:, cs] if base is None else x[:, cs] - base[:, cs]
            g += xs @ xs.T
    return g


def _lora_gram(
    x: np.ndarray,
    base: np.ndarray | None,
    sa: slice,
    shape_a: tuple[int, ...],
    sb: slice,
    shape_b: tuple[int, ...],
) -> np.ndarray:
    """Gram of ``ΔW_i = B_i A_i`` (minus ``B̄ Ā`` of ``base``) without forming ``ΔW``.

    ``<B_i A_i, B_k A_k> = sum((B_iᵀ B_k) * (A_i A_kᵀ))``. With a base the difference
    ``B A - B̄ Ā = [B | B̄] [A ; -Ā]`` is a rank-``2r`` product, handled the same way.
    Two SYRK products over the stacked factors, in client blocks. Returns ``(N, N)`` float64.
    """
    n = x.shape[0]
    r, d_in = shape_a
    d_out = shape_b[0]
    a = x[:, sa].reshape(n, r, d_in)
    b = x[:, sb].reshape(n, d_out, r)
    if base is not None:
        ab = np.broadcast_to(base[:, sa].reshape(-1, r, d_in), a.shape)
        bb = np.broadcast_to(base[:, sb].reshape(-1, d_out, r), b.shape)
        a = np.concatenate([a, -ab], axis=1)
        b = np.concatenate([b, bb], axis=2)
        r = 2 * r
    # float64 factors: the sum of r*r factor products cancels heavily when ΔW's are nearly
    # collinear, and float32 then leaves errors ~1e-4 in the cosine (factors are small: r x d)
    am = np.ascontiguousarray(a, dtype=np.float64).reshape(n * r, d_in)  # rows (i, p): A_i[p, :]
    bm = np.ascontiguousarray(b.transpose(0, 2, 1), dtype=np.float64).reshape(n * r, d_out)
    g = np.empty((n, n), dtype=np.float64)
    block = max(1, _LORA_BLOCK_ELEMENTS // max(1, n * r * r))
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        aa = am[i0 * r : i1 * r] @ am.T  # (b*r, n*r): (A_i A_kᵀ)[p, q]
        bbm = bm[i0 * r : i1 * r] @ bm.T  # (b*r, n*r): (B_iᵀ B_k)[p, q]
        aa *= bbm
        g[i0:i1] = aa.reshape(i1 - i0, r, n, r).sum(axis=(1, 3))
    return g


def _plan_gram(x: np.ndarray, base: np.ndarray | None, plan: _Plan) -> np.ndarray:
    g = _plain_gram(x, base, plan.slices)
    for sa, shape_a, sb, shape_b in plan.pairs:
        g += _lora_gram(x, base, sa, shape_a, sb, shape_b)
    return g


def _check_inputs(
    vectors: np.ndarray, layout: Layout, base: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    x = _as_matrix(vectors)
    if x.shape[1] != layout.size:
        raise ValueError(f"vectors have D={x.shape[1]}, layout has D={layout.size}")
    if base is None:
        return x, None
    b = np.asarray(as_float32(base) if hasattr(base, "detach") else base)
    if b.ndim == 1:
        b = b[None, :]
    if b.ndim != 2 or b.shape[1] != x.shape[1] or b.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"base must have shape (D,), (1, D) or {x.shape}, got {b.shape}")
    return x, b


# --------------------------------------------------------------------------- public API


def per_module_similarity(
    vectors: np.ndarray,
    layout: Layout,
    *,
    modules: Sequence[str] = (),
    center: bool = False,
    lora_product: bool = False,
    base: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Cosine similarity per module group (see :func:`~fedbip_ray.core.taskvector.module_key`).

    Args:
        vectors: ``(N, D)`` float32 stacked vectors.
        layout: layout of ``D``.
        modules, center, lora_product, base: as in :func:`similarity_matrix`.

    Returns:
        ``(keys, sims)``: module keys in layout order and ``(G, N, N)`` float64 cosines.
    """
    x, b = _check_inputs(vectors, layout, base)
    plans = _plans(layout, select_parameters(layout, modules), lora_product)
    n = x.shape[0]
    sims = np.empty((len(plans), n, n), dtype=np.float64)
    for i, plan in enumerate(plans.values()):
        g = _plan_gram(x, b, plan)
        sims[i] = gram_to_cosine(center_gram(g) if center else g)
    return list(plans), sims


def similarity_matrix(
    vectors: np.ndarray,
    layout: Layout,
    *,
    scope: str = "flat",
    modules: Sequence[str] = (),
    center: bool = False,
    lora_product: bool = False,
    base: np.ndarray | None = None,
) -> np.ndarray:
    """Client-by-client cosine similarity of ``vectors`` ``(N, D)``: ``(N, N)`` float64.

    Args:
        vectors: ``(N, D)`` float32 stacked task vectors (or, with ``base``, parameters).
        layout: layout of ``D``.
        scope: ``"flat"`` cosine of whole vectors; ``"layer"`` mean over module groups of the
            per-module cosine (a module whose vector is zero contributes 0 off the diagonal);
            ``"modules"`` cosine of the parameters selected by ``modules`` only.
        modules: substrings; parameters whose name contains any are kept (e.g.
            ``("classifier",)``). Applies to every scope; required for ``"modules"``.
        center: subtract the mean client vector first (done on the Gram matrix).
        lora_product: compare each LoRA module by ``ΔW = B @ A`` instead of its factors,
            without forming ``ΔW``; other parameters are compared by plain dot products.
        base: optional ``(D,)`` or ``(N, D)`` reference. The compared quantity is
            ``f(vectors) - f(base)`` with ``f`` the identity (or ``B @ A`` for LoRA pairs
            under ``lora_product``), e.g. ``vectors=θ, base=θ̄`` compares the per-round change
            of ``ΔW``. Without ``lora_product`` it is simply ``vectors - base``.

    Raises:
        ValueError: unknown ``scope``, a ``modules`` filter matching nothing, bad shapes.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown similarity scope {scope!r} (known: {', '.join(SCOPES)})")
    if scope == "modules" and not modules:
        raise ValueError("scope 'modules' needs a non-empty modules filter, e.g. ('classifier',)")
    if scope == "layer":
        _, sims = per_module_similarity(
            vectors, layout, modules=modules, center=center, lora_product=lora_product, base=base
        )
        if sims.shape[0] == 0:
            return np.eye(_as_matrix(vectors).shape[0])
        s = sims.mean(axis=0)
        np.fill_diagonal(s, 1.0)
        return s
    x, b = _check_inputs(vectors, layout, base)
    plans = _plans(layout, select_parameters(layout, modules), lora_product)
    merged = _Plan(
        slices=_merge_runs([s for p in plans.values() for s in p.slices]),
        pairs=[pair for p in plans.values() for pair in p.pairs],
    )
    g = _plan_gram(x, b, merged)
    return gram_to_cosine(center_gram(g) if center else g)


@dataclass(frozen=True)
class ModuleGrams:
    """Per-module Gram matrices of a column block: ``keys`` (module keys, layout order) and
    ``grams`` ``(G, N, N)`` float64. Blocks split at module boundaries hold disjoint keys, so
    combining them (:meth:`combine`, in block order) gives the whole adapter's."""

    keys: tuple[str, ...]
    grams: np.ndarray

    @classmethod
    def combine(cls, parts: Sequence[ModuleGrams]) -> ModuleGrams:
        keys = tuple(k for p in parts for k in p.keys)
        if len(set(keys)) != len(keys):
            raise ValueError("column blocks share a module: they must split at module "
                             "boundaries")
        n = next((p.grams.shape[1] for p in parts if p.grams.ndim == 3), 0)
        grams = [p.grams for p in parts if len(p.keys)]
        return cls(keys, np.concatenate(grams) if grams else np.zeros((0, n, n)))

    def total(self) -> np.ndarray:
        """``(N, N)`` sum of the modules' Grams, added in key order."""
        g = np.zeros(self.grams.shape[1:], dtype=np.float64)
        for m in self.grams:
            g += m
        return g


def module_grams(
    vectors: Any,
    layout: Layout,
    *,
    modules: Sequence[str] = (),
    lora_product: bool = False,
    base: np.ndarray | None = None,
) -> ModuleGrams:
    """:class:`ModuleGrams` of ``vectors`` ``(N, D)`` (arguments as in
    :func:`similarity_matrix`); a ``modules`` filter matching nothing here gives no keys."""
    x, b = _check_inputs(vectors, layout, base)
    names = [n for n in layout.names if not modules or any(m in n for m in modules)]
    plans = _plans(layout, names, lora_product)
    n = x.shape[0]
    grams = np.empty((len(plans), n, n), dtype=np.float64)
    for i, plan in enumerate(plans.values()):
        grams[i] = _plan_gram(x, b, plan)
    return ModuleGrams(tuple(plans), grams)


def module_similarity(grams: ModuleGrams, scope: str = "flat", center: bool = False
                      ) -> np.ndarray:
    """``(N, N)`` cosine similarity from the whole adapter's :class:`ModuleGrams`: of the sum
    of the Grams (``flat``, ``modules``) or the mean over modules of each module's cosine
    (``layer``; the identity without modules). ``center`` as in :func:`similarity_matrix`."""
    n = grams.grams.shape[1]
    if scope == "layer":
        if not grams.keys:
            return np.eye(n)
        s = np.mean([gram_to_cosine(center_gram(g) if center else g) for g in grams.grams],
                    axis=0)
        np.fill_diagonal(s, 1.0)
        return s
    g = grams.total()
    return gram_to_cosine(center_gram(g) if center else g)


def smooth_similarity(prev: np.ndarray | None, current: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average ``beta * prev + (1 - beta) * current`` (float64).

    ``prev`` None returns a copy of ``current``. ``beta`` must lie in ``[0, 1]``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    cur = np.array(current, dtype=np.float64)
    if prev is None:
        return cur
    p = np.asarray(prev, dtype=np.float64)
    if p.shape != cur.shape:
        raise ValueError(f"prev similarity has shape {p.shape}, current {cur.shape}")
    return beta * p + (1.0 - beta) * cur
