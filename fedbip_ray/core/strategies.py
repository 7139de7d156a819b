"""Aggregation strategies: small frozen dataclasses and their registry.

A strategy maps one round's :class:`AggregationInput` (the participants' received states and
their task vectors, stacked as ``(N, D)`` float32 matrices) to an :class:`AggregationResult`
(their next personalized states); ``client_options`` tells the runtime how clients should train
(proximal term, fine-tuning before evaluation). Those types live in :mod:`.interface`, the
wrappers (clipping, DP noise) in :mod:`.wrappers`; both are re-exported here. ``fedbip`` and
``fedbip-layer`` live in :mod:`.fedbip`, the peer methods in :mod:`.peers`.

Each strategy's parameters are its dataclass fields, each declared once with its
:class:`~fedbip_ray.core.params.Check`; :func:`check_strategy_params` validates a raw mapping
against them (the only validator) and :func:`construct_strategy` builds from its output
without checking again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .aggregate import aggregate_task_vectors, mix_models
from .fedala import FedALAStrategy
from .fedbip import FedBipLayerStrategy, FedBipStrategy
from .feddpa import FedDPAStrategy
from .interface import (
    AggregationInput,
    AggregationResult,
    ClientOptions,
    Plan,
    RoundMeta,
    Strategy,
    run_strategy,
)
from .params import NONNEGATIVE, POSITIVE, Check, ParamError, check_params, param, param_names
from .peers import FedAWAStrategy, FedSALoRAStrategy, fedavg_states
from .similarity import ModuleGrams, module_grams, module_similarity
from .weights import (
    fedamp_from_gram,
    fedavg_weights,
    local_weights,
    oracle_weights,
    personalized_weights,
)
from .wrappers import ClippedStrategy, GaussianNoiseStrategy

__all__ = [
    "STRATEGIES",
    "AggregationInput",
    "AggregationResult",
    "ClientOptions",
    "ClippedStrategy",
    "FedALAStrategy",
    "FedAMPStrategy",
    "FedAWAStrategy",
    "FedAvgFTStrategy",
    "FedAvgStrategy",
    "FedBipPaperStrategy",
    "FedDPAStrategy",
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

EPOCHS = Check("integer", ge=0)


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class _Base:
    """No statistics; ``aggregate`` is the three steps over every column."""

    name: ClassVar[str] = ""

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions()

    def statistics(self, inp: AggregationInput) -> object | None:
        return None

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return run_strategy(self, inp)


@dataclass(frozen=True)
class LocalStrategy(_Base):
    """No federation: each client keeps its own fine-tuned model."""

    name: ClassVar[str] = "local"

    def plan(self, stats: None, meta: RoundMeta) -> Plan:
        return Plan(local_weights(meta.n))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        return inp.theta()


@dataclass(frozen=True)
class FedAvgStrategy(_Base):
    """FedAvg: every client gets the example-weighted average of all ``θ``."""

    name: ClassVar[str] = "fedavg"

    def plan(self, stats: None, meta: RoundMeta) -> Plan:
        return Plan(fedavg_weights(meta.counts))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        return fedavg_states(inp, plan.weights[0])


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

    def statistics(self, inp: AggregationInput) -> ModuleGrams:
        """Per-module Grams of the mean-centered ``θ`` (the mean is per column)."""
        theta = inp.theta()
        theta -= theta.mean(axis=0, dtype=np.float64).astype(np.float32)
        return module_grams(theta, inp.layout)

    def plan(self, stats: ModuleGrams, meta: RoundMeta) -> Plan:
        return Plan(fedamp_from_gram(stats.total(), sigma=self.sigma, alpha_k=self.alpha_k))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        return mix_models(inp.theta(), plan.weights)


@dataclass(frozen=True)
class FedBipPaperStrategy(_Base):
    """The published FedBip rule: flat per-round task vectors, ``p_ik = S_ik / Σ_j S_ij``."""

    name: ClassVar[str] = "fedbip-paper"

    def statistics(self, inp: AggregationInput) -> ModuleGrams:
        return module_grams(inp.deltas, inp.layout)

    def plan(self, stats: ModuleGrams, meta: RoundMeta) -> Plan:
        s = module_similarity(stats)
        return Plan(personalized_weights(s), similarity=s)

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        return aggregate_task_vectors(inp.states, inp.deltas, plan.weights)


@dataclass(frozen=True)
class OracleStrategy(_Base):
    """FedAvg inside each true client group (needs ``AggregationInput.groups``)."""

    name: ClassVar[str] = "oracle"

    def plan(self, stats: None, meta: RoundMeta) -> Plan:
        if meta.groups is None:
            raise ValueError("strategy 'oracle' needs the true client groups (groups is None)")
        return Plan(oracle_weights(meta.groups, meta.counts))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        return mix_models(inp.theta(), plan.weights)


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
        FedALAStrategy,
        FedDPAStrategy,
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
