"""Aggregation strategies: small frozen dataclasses and their registry.

A strategy maps one round's :class:`AggregationInput` (the participants' received states and
their task vectors, stacked as ``(N, D)`` float32 matrices) to an :class:`AggregationResult`
(their next personalized states); ``client_options`` tells the runtime how clients should train
(proximal term, fine-tuning before evaluation). Those types live in :mod:`.interface`, the
wrappers (clipping, DP noise) in :mod:`.wrappers`; both are re-exported here.

Each strategy's parameters are its dataclass fields, each declared once with its
:class:`~fedbip_ray.core.params.Check`; :func:`check_strategy_params` validates a raw mapping
against them (the only validator) and :func:`construct_strategy` builds from its output
without checking again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .aggregate import aggregate_layerwise, aggregate_task_vectors, mix_models
from .gate import check_mixes
from .interface import AggregationInput, AggregationResult, ClientOptions, Strategy
from .lora import exact_lora_states
from .params import NONNEGATIVE, POSITIVE, Check, ParamError, check_params, param, param_names
from .peers import FedAWAStrategy, FedSALoRAStrategy
from .similarity import (
    SCOPES,
    SumOfMatrices,
    cosine_similarity,
    per_module_similarity,
    similarity_matrix,
    smooth_similarity,
)
from .taskvector import module_groups
from .weights import (
    SELF_SIMILARITY_CHECK,
    TEMPERATURE,
    THRESHOLD,
    TOP_K,
    fedamp_weights,
    fedavg_weights,
    local_weights,
    oracle_weights,
    personalized_weights,
)
from .wrappers import ClippedStrategy, GaussianNoiseStrategy

__all__ = [
    "REFERENCES",
    "STRATEGIES",
    "AggregationInput",
    "AggregationResult",
    "ClientOptions",
    "ClippedStrategy",
    "FedAMPStrategy",
    "FedAWAStrategy",
    "FedAvgFTStrategy",
    "FedAvgStrategy",
    "FedBipLayerStrategy",
    "FedBipPaperStrategy",
    "FedBipStrategy",
    "FedProxStrategy",
    "FedSALoRAStrategy",
    "GaussianNoiseStrategy",
    "LocalStrategy",
    "OracleStrategy",
    "ParamError",
    "Strategy",
    "check_strategy_params",
    "construct_strategy",
    "make_strategy",
    "strategy_param_names",
]

REFERENCES: tuple[str, ...] = ("round", "pretrained", "gradient")

BOOL = Check("bool")
EPOCHS = Check("integer", ge=0)
SMOOTHING = Check("number", ge=0.0, lt=1.0)
REFERENCE = Check("choice", choices=REFERENCES)
SCOPE = Check("choice", choices=SCOPES)
GATE = Check("custom", convert=check_mixes)


def _module_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """``modules`` as a tuple of non-empty strings (one string is one module)."""
    mods = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(m, str) and m for m in mods):
        raise ValueError(f"modules must be non-empty strings, got {value!r}")
    return mods


MODULES = Check("custom", convert=_module_names)


# --------------------------------------------------------------------------- helpers


def _fedavg_states(inp: AggregationInput) -> tuple[np.ndarray, np.ndarray]:
    """FedAvg of ``θ``: the same ``(D,)`` average for every client, computed once."""
    w = fedavg_weights(inp.counts)
    row = w[0].astype(np.float32)
    avg = row @ inp.states
    avg += row @ inp.deltas
    return np.repeat(avg[None, :], inp.n, axis=0), w


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


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class _Base:
    name: ClassVar[str] = ""

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions()


@dataclass(frozen=True)
class LocalStrategy(_Base):
    """No federation: each client keeps its own fine-tuned model."""

    name: ClassVar[str] = "local"

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return AggregationResult(states=inp.theta(), weights=local_weights(inp.n))


@dataclass(frozen=True)
class FedAvgStrategy(_Base):
    """FedAvg: every client gets the example-weighted average of all ``θ``."""

    name: ClassVar[str] = "fedavg"

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        states, w = _fedavg_states(inp)
        return AggregationResult(states=states, weights=w)


@dataclass(frozen=True)
class FedAvgFTStrategy(FedAvgStrategy):
    """FedAvg, then ``finetune_epochs`` local epochs on the global model before evaluation."""

    name: ClassVar[str] = "fedavg-ft"
    finetune_epochs: int = param(1, EPOCHS)

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(finetune_epochs_before_eval=self.finetune_epochs)


@dataclass(frozen=True)
class FedProxStrategy(FedAvgStrategy):
    """FedAvg aggregation with a proximal term ``prox_mu/2 ||θ - θ̄||²`` on the clients."""

    name: ClassVar[str] = "fedprox"
    prox_mu: float = param(0.01, NONNEGATIVE)

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(prox_mu=self.prox_mu)


@dataclass(frozen=True)
class FedAMPStrategy(_Base):
    """FedAMP (PFLlib): attention-weighted personalized cloud models ``u_i = Σ_j ξ_ij θ_j``.

    Defaults: ``sigma=1.0`` (PFLlib's default), ``alpha_k=0.1`` (so up to ten near-identical
    peers fit before a row saturates, see :func:`fedamp_weights`), ``prox_mu=0.1``: clients
    train with ``prox_mu/2 ||θ - u_i||²`` toward their cloud model (PFLlib's ``lamda/alphaK``).
    """

    name: ClassVar[str] = "fedamp"
    sigma: float = param(1.0, POSITIVE)
    alpha_k: float = param(0.1, NONNEGATIVE)
    prox_mu: float = param(0.1, NONNEGATIVE)

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(prox_mu=self.prox_mu)

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        theta = inp.theta()
        w = fedamp_weights(theta, sigma=self.sigma, alpha_k=self.alpha_k)
        return AggregationResult(states=mix_models(theta, w), weights=w)


@dataclass(frozen=True)
class FedBipPaperStrategy(_Base):
    """The published FedBip rule: flat per-round task vectors, ``p_ik = S_ik / Σ_j S_ij``."""

    name: ClassVar[str] = "fedbip-paper"

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        s = cosine_similarity(inp.deltas)
        w = personalized_weights(s)
        states = aggregate_task_vectors(inp.states, inp.deltas, w)
        return AggregationResult(states=states, weights=w, similarity=s)


@dataclass(frozen=True)
class _FedBipOptions(_Base):
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
        lora_exact: aggregate each LoRA module in ``ΔW = B A`` space, truncated back to rank
            ``r`` by an SVD (:mod:`fedbip_ray.core.lora`), instead of averaging the factors.
    """

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
    lora_exact: bool = param(False, BOOL)

    @property
    def _lora(self) -> bool:
        """Compare LoRA modules as ``B @ A`` (never for gradient signals)."""
        return self.lora_product and self.reference != "gradient"

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(gate_mixes=self.gate, send_gradient=self.reference == "gradient")

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


@dataclass(frozen=True)
class FedBipStrategy(_FedBipOptions):
    """FedBip with our similarity options (see :class:`_FedBipOptions`).

    Extra attributes: ``scope`` and ``modules`` as in :func:`similarity_matrix`.

    Defaults (chosen on validation accuracy, see benchmarks/results/accuracy.md): compare
    cumulative task vectors (``reference="pretrained"``) with LoRA modules as ``B @ A``; keep
    the peers more similar than the client's average peer (``threshold=0``,
    ``relative_threshold``), drop negatives, and weigh self like the most similar kept peer
    (``self_similarity="max-peer"``); gate every client on its validation split
    (``gate=(1, 0.5, 0)``). Per-round, flat task vectors of different clients are nearly
    orthogonal under Adam, so the paper rule stays close to local training; under strong label
    skew cumulative vectors all look alike, and the gate keeps clients near their own models.
    """

    name: ClassVar[str] = "fedbip"
    scope: str = param("flat", SCOPE)
    modules: tuple[str, ...] = param((), MODULES)

    @staticmethod
    def check_together(values: Mapping[str, Any]) -> None:
        """ParamError when ``scope`` is ``modules`` without a modules list."""
        if values["scope"] == "modules" and not values["modules"]:
            raise ParamError("scope 'modules' needs a non-empty modules list", "modules")

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        vectors, base = _compared(inp, self.reference, self._lora)
        s = similarity_matrix(
            vectors,
            inp.layout,
            scope=self.scope,
            modules=self.modules,
            center=self.center,
            lora_product=self._lora,
            base=base,
        )
        prev = inp.prev_similarity
        if prev is not None and prev.ndim == 3:
            prev = prev.mean(axis=0)
        s = self._smooth(prev, s)
        w = self._weights(s)
        states = aggregate_task_vectors(inp.states, inp.deltas, w)
        if self.lora_exact:
            exact_lora_states(states, inp.states, inp.deltas, inp.layout, lambda _key: w)
        return AggregationResult(states=states, weights=w, similarity=s)


@dataclass(frozen=True)
class FedBipLayerStrategy(_FedBipOptions):
    """FedBip-L: one similarity and weight matrix per module group (layer).

    Same options as ``fedbip`` except ``scope``/``modules`` (every module group gets weights).
    ``prev_similarity`` may be ``(G, N, N)`` (per group) or ``(N, N)`` (used for every group).
    """

    name: ClassVar[str] = "fedbip-layer"

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        vectors, base = _compared(inp, self.reference, self._lora)
        keys, sims = per_module_similarity(
            vectors,
            inp.layout,
            center=self.center,
            lora_product=self._lora,
            base=base,
        )
        sims = self._smooth(inp.prev_similarity, sims)
        layer_w = (
            np.stack([self._weights(s) for s in sims]) if len(keys) else np.zeros((0, inp.n, inp.n))
        )
        groups = module_groups(inp.layout)
        if list(groups) != keys:  # pragma: no cover - both follow layout order
            raise RuntimeError("module groups and similarity groups disagree")
        states = aggregate_layerwise(inp.states, inp.deltas, layer_w, list(groups.values()))
        if self.lora_exact:
            per_key = dict(zip(keys, layer_w, strict=True))
            exact_lora_states(states, inp.states, inp.deltas, inp.layout, per_key.__getitem__)
        return AggregationResult(
            states=states,
            weights=layer_w.mean(axis=0) if len(keys) else local_weights(inp.n),
            similarity=sims.mean(axis=0) if len(keys) else None,
            layer_weights=layer_w,
            layer_similarity=sims,
            layer_names=tuple(keys),
        )


@dataclass(frozen=True)
class OracleStrategy(_Base):
    """FedAvg inside each true client group (needs ``AggregationInput.groups``)."""

    name: ClassVar[str] = "oracle"

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        if inp.groups is None:
            raise ValueError("strategy 'oracle' needs the true client groups (groups is None)")
        w = oracle_weights(inp.groups, inp.counts)
        return AggregationResult(states=mix_models(inp.theta(), w), weights=w)


# --------------------------------------------------------------------------- registry

STRATEGIES: dict[str, type] = {
    cls.name: cls
    for cls in (
        LocalStrategy,
        FedAvgStrategy,
        FedAvgFTStrategy,
        FedProxStrategy,
        FedAMPStrategy,
        FedBipPaperStrategy,
        FedBipStrategy,
        FedBipLayerStrategy,
        OracleStrategy,
        FedSALoRAStrategy,
        FedAWAStrategy,
    )
}


def _strategy_class(name: str) -> type:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None


def strategy_param_names(name: str) -> tuple[str, ...]:
    """Names of the parameters strategy ``name`` accepts (ValueError for an unknown name)."""
    return param_names(_strategy_class(name))


def check_strategy_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one validator of strategy parameters: the given keys of ``params``, normalized.

    ValueError names an unknown strategy; :class:`ParamError` an unknown parameter or a bad
    value (its ``param`` attribute is the parameter's name).
    """
    return check_params(_strategy_class(name), params, name)


def construct_strategy(name: str, checked: Mapping[str, Any]) -> Strategy:
    """Strategy ``name`` from parameters already returned by :func:`check_strategy_params`
    (no checks again)."""
    return _strategy_class(name)(**checked)


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build strategy ``name`` from raw ``params`` (validated once, ValueError on a bad one)."""
    return construct_strategy(name, check_strategy_params(name, params))
