"""FedBip with our similarity options: ``fedbip`` (one similarity over the chosen scope) and
``fedbip-layer`` (one similarity and weight matrix per module group), registered in
:mod:`.strategies`.

Their shared parameters live on :class:`_FedBipOptions`, each declared once with its
:class:`~fedbip_ray.core.params.Check`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .aggregate import aggregate_layerwise, aggregate_task_vectors
from .gate import GATE_TIES, check_mixes
from .interface import (
    AggregationInput,
    AggregationResult,
    ClientOptions,
    Plan,
    RoundMeta,
    run_strategy,
)
from .lora import exact_lora_states
from .params import Check, ParamError, param
from .similarity import (
    SCOPES,
    ModuleGrams,
    SumOfMatrices,
    center_gram,
    gram_to_cosine,
    module_grams,
    module_similarity,
    select_parameters,
    smooth_similarity,
)
from .taskvector import module_groups
from .weights import (
    SELF_SIMILARITY_CHECK,
    TEMPERATURE,
    THRESHOLD,
    TOP_K,
    local_weights,
    personalized_weights,
)

__all__ = ["REFERENCES", "FedBipLayerStrategy", "FedBipStrategy"]

REFERENCES: tuple[str, ...] = ("round", "pretrained", "gradient")

BOOL = Check("bool")
SMOOTHING = Check("number", ge=0.0, lt=1.0)
REFERENCE = Check("choice", choices=REFERENCES)
SCOPE = Check("choice", choices=SCOPES)
GATE = Check("custom", convert=check_mixes)
GATE_MEMORY = Check("number", ge=0.0, le=1.0)
GATE_TIES_CHECK = Check("choice", choices=GATE_TIES)


def _module_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """``modules`` as a tuple of non-empty strings (one string is one module)."""
    mods = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(m, str) and m for m in mods):
        raise ValueError(f"modules must be non-empty strings, got {value!r}")
    return mods


MODULES = Check("custom", convert=_module_names)


def _compared(inp: AggregationInput, reference: str, lora_product: bool) -> tuple[np.ndarray, Any]:
    """``(vectors, base)`` handed to the similarity functions for a reference choice
    (``lora_product`` already False for gradients)."""
    if reference == "gradient":
        if inp.signals is None:
            raise ValueError("reference 'gradient' needs the clients' gradient signals")
        return inp.signals, None
    if reference == "pretrained":
        if inp.init is None:
            raise ValueError("reference 'pretrained' needs AggregationInput.init")
        return SumOfMatrices(inp.states, inp.deltas), inp.init
    if lora_product:
        return SumOfMatrices(inp.states, inp.deltas), inp.states
    return inp.deltas, None


@dataclass(frozen=True)
class _FedBipOptions:
    """Options shared by ``fedbip`` and ``fedbip-layer``.

    Attributes:
        threshold, clip_negative, temperature, top_k: see :func:`personalized_weights`.
        reference: ``"round"`` compares per-round task vectors (the paper);
            ``"pretrained"`` compares cumulative vectors ``θ - init``; ``"gradient"`` compares
            an optimizer-neutral signal: the negated sum of each client's loss gradients over
            the round (Adam's per-coordinate scaling left out; clients send it beside the task
            vector, ``lora_product`` does not apply, ``smoothing`` accumulates it over rounds).
            The per-round deltas are aggregated either way.
        center: subtract the mean task vector before the cosine.
        lora_product: compare LoRA modules by ``ΔW = B @ A`` (per-round change of ``ΔW`` for
            ``"round"``, ``ΔW`` itself for ``"pretrained"`` since LoRA's ``B`` starts at 0).
        smoothing: EMA weight ``beta`` on ``prev_similarity`` (0 = off).
        gate: validation-gate mixes ``λ`` (:mod:`fedbip_ray.core.gate`); ``[]`` turns it off.
        gate_memory: weight of the gate's earlier rounds of evidence, per round of age (0:
            this round only; :func:`fedbip_ray.core.gate.pool_rounds`).
        gate_ties: ``"aggregate"`` (exact accuracy ties keep the largest λ), ``"loss"`` (the
            lowest validation loss breaks them) or ``"loss-se"`` (the largest λ whose loss is
            within one standard error of the lowest; :func:`fedbip_ray.core.gate.choose_mix`).
        lora_exact: aggregate each LoRA module in ``ΔW = B A`` space, truncated back to rank
            ``r`` by an SVD (:mod:`fedbip_ray.core.lora`), instead of averaging the factors.
    """

    name: ClassVar[str] = ""
    threshold: float | None = param(0.0, THRESHOLD)
    clip_negative: bool = param(True, BOOL)
    temperature: float | None = param(None, TEMPERATURE)
    top_k: int | None = param(None, TOP_K)
    reference: str = param("pretrained", REFERENCE)
    center: bool = param(False, BOOL)
    lora_product: bool = param(True, BOOL)
    smoothing: float = param(0.0, SMOOTHING)
    relative_threshold: bool = param(True, BOOL)
    self_similarity: str = param("max-peer", SELF_SIMILARITY_CHECK)
    gate: tuple[float, ...] = param((1.0, 0.5, 0.0), GATE)
    gate_memory: float = param(0.0, GATE_MEMORY)
    gate_ties: str = param("loss-se", GATE_TIES_CHECK)
    lora_exact: bool = param(False, BOOL)

    @property
    def _lora(self) -> bool:
        """Compare LoRA modules as ``B @ A`` (never for gradient signals)."""
        return self.lora_product and self.reference != "gradient"

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(gate_mixes=self.gate, gate_memory=self.gate_memory,
                             gate_ties=self.gate_ties,
                             send_gradient=self.reference == "gradient")

    def _weights(self, s: np.ndarray) -> np.ndarray:
        return personalized_weights(
            s,
            threshold=self.threshold,
            clip_negative=self.clip_negative,
            temperature=self.temperature,
            top_k=self.top_k,
            relative_threshold=self.relative_threshold,
            self_similarity=self.self_similarity,
        )

    def _smooth(self, prev: np.ndarray | None, s: np.ndarray) -> np.ndarray:
        if prev is None or self.smoothing == 0:
            return s
        if prev.shape != s.shape:
            prev = np.broadcast_to(prev, s.shape)
        return smooth_similarity(prev, s, self.smoothing)

    def _grams(self, inp: AggregationInput, modules: tuple[str, ...] = ()) -> ModuleGrams:
        """Per-module Grams of what the options compare, over ``inp``'s columns."""
        vectors, base = _compared(inp, self.reference, self._lora)
        return module_grams(vectors, inp.layout, modules=modules, lora_product=self._lora,
                            base=base)

    def _exact(self, states: np.ndarray, inp: AggregationInput, plan: Plan) -> np.ndarray:
        """``states`` with LoRA modules aggregated in ``ΔW`` space when ``lora_exact``."""
        if self.lora_exact:
            exact_lora_states(states, inp.states, inp.deltas, inp.layout, plan.weights_for)
        return states

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return run_strategy(self, inp)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FedBipStrategy(_FedBipOptions):
    """FedBip with our similarity options (see :class:`_FedBipOptions`).

    Extra attributes: ``scope`` and ``modules`` as in :func:`similarity_matrix`.

    Defaults (chosen on validation accuracy, see benchmarks/results/accuracy.md): compare
    cumulative task vectors (``reference="pretrained"``) with LoRA modules as ``B @ A``; keep
    the peers more similar than the client's average peer (``threshold=0``,
    ``relative_threshold``), drop negatives, and weigh self like the most similar kept peer
    (``self_similarity="max-peer"``); gate every client on its validation split
    (``gate=(1, 0.5, 0)``, exact accuracy ties broken by the validation loss). Per-round, flat
    task vectors of different clients are nearly orthogonal under Adam, so the paper rule stays
    close to local training; under strong label skew cumulative vectors all look alike, and the
    gate keeps clients near their own models.
    """

    name: ClassVar[str] = "fedbip"
    scope: str = param("flat", SCOPE)
    modules: tuple[str, ...] = param((), MODULES)

    @staticmethod
    def check_together(values: Mapping[str, Any]) -> None:
        """ParamError when ``scope`` is ``modules`` without a modules list."""
        if values["scope"] == "modules" and not values["modules"]:
            raise ParamError("scope 'modules' needs a non-empty modules list", "modules")

    def statistics(self, inp: AggregationInput) -> ModuleGrams:
        return self._grams(inp, self.modules)

    def plan(self, stats: ModuleGrams, meta: RoundMeta) -> Plan:
        if self.modules:
            select_parameters(meta.layout, self.modules)  # ValueError when it matches nothing
        s = module_similarity(stats, "layer" if self.scope == "layer" else "flat", self.center)
        prev = meta.prev_similarity
        if prev is not None and prev.ndim == 3:
            prev = prev.mean(axis=0)
        s = self._smooth(prev, s)
        return Plan(self._weights(s), similarity=s)

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        states = aggregate_task_vectors(inp.states, inp.deltas, plan.weights)
        return self._exact(states, inp, plan)


@dataclass(frozen=True)
class FedBipLayerStrategy(_FedBipOptions):
    """FedBip-L: one similarity and weight matrix per module group (layer).

    Same options as ``fedbip`` except ``scope``/``modules`` (every module group gets weights).
    ``prev_similarity`` may be ``(G, N, N)`` (per group) or ``(N, N)`` (used for every group).
    """

    name: ClassVar[str] = "fedbip-layer"

    def statistics(self, inp: AggregationInput) -> ModuleGrams:
        return self._grams(inp)

    def plan(self, stats: ModuleGrams, meta: RoundMeta) -> Plan:
        keys, n = stats.keys, meta.n
        sims = np.stack([gram_to_cosine(center_gram(g) if self.center else g)
                         for g in stats.grams]) if keys else np.zeros((0, n, n))
        sims = self._smooth(meta.prev_similarity, sims)
        layer_w = np.stack([self._weights(s) for s in sims]) if keys else np.zeros((0, n, n))
        if list(module_groups(meta.layout)) != list(keys):  # pragma: no cover - layout order
            raise RuntimeError("module groups and similarity groups disagree")
        return Plan(
            weights=layer_w.mean(axis=0) if keys else local_weights(n),
            similarity=sims.mean(axis=0) if keys else None,
            layer_weights=layer_w, layer_similarity=sims, layer_names=tuple(keys),
        )

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        groups = module_groups(inp.layout)
        layer_w = (np.stack([plan.weights_for(k) for k in groups]) if groups
                   else np.zeros((0, inp.n, inp.n)))
        states = aggregate_layerwise(inp.states, inp.deltas, layer_w, list(groups.values()))
        return self._exact(states, inp, plan)
