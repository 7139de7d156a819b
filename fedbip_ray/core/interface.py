"""What a strategy is given and returns: one round's :class:`AggregationInput` (stacked
``(N, D)`` float32 matrices), its :class:`AggregationResult`, the :class:`ClientOptions` that
tell the runtime how clients train, and the :class:`Strategy` protocol.

Every strategy runs in three steps, so that a server split along the parameter axis computes
the same result (:mod:`.blocks`): :meth:`Strategy.statistics` of a column block (additive
over blocks, e.g. per-module Gram matrices), :meth:`Strategy.plan` from the combined
statistics and the round's :class:`RoundMeta` (the weights, ``N x N``), and
:meth:`Strategy.apply` of the plan to a column block. :func:`run_strategy` chains them over
one block holding every column."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from .taskvector import Layout

__all__ = ["ALAOptions", "AggregationInput", "AggregationResult", "ClientOptions", "DPAOptions",
           "Plan", "RoundMeta", "Strategy", "run_strategy"]


@dataclass(frozen=True)
class AggregationInput:
    """One round's inputs for ``N`` participants.

    Attributes:
        states: ``(N, D)`` float32 personalized states the participants received this round.
        deltas: ``(N, D)`` float32 task vectors ``τᵢ = θᵢ - statesᵢ``.
        counts: ``(N,)`` int training example counts.
        layout: layout of ``D``.
        init: ``(D,)`` float32 initial adapter (needed for ``reference="pretrained"``).
        groups: ``(N,)`` int true client groups (needed by ``oracle``; used for diagnostics).
        prev_similarity: ``(N, N)`` (or, for ``fedbip-layer``, ``(G, N, N)``) similarity of
            the previous round for these participants, for smoothing.
        signals: ``(N, D)`` float32 optimizer-neutral signals (the negated sum of the loss
            gradients over the round's local steps), needed for ``reference="gradient"``.
        memory: ``(N, M)`` float64 per-client strategy memory: the rows the strategy returned
            in :attr:`AggregationResult.memory` the last round each participant took part (a
            row of NaN: none yet); e.g. FedAWA's learnable logits.
    """

    states: np.ndarray
    deltas: np.ndarray
    counts: np.ndarray
    layout: Layout
    init: np.ndarray | None = None
    groups: np.ndarray | None = None
    prev_similarity: np.ndarray | None = None
    signals: np.ndarray | None = None
    memory: np.ndarray | None = None

    def __post_init__(self) -> None:
        states = np.asarray(self.states, dtype=np.float32)
        deltas = np.asarray(self.deltas, dtype=np.float32)
        if states.ndim != 2 or states.shape != deltas.shape:
            raise ValueError(
                f"states and deltas must be (N, D) of one shape, got {states.shape} "
                f"and {deltas.shape}"
            )
        n, d = states.shape
        if d != self.layout.size:
            raise ValueError(f"vectors have D={d}, layout has D={self.layout.size}")
        counts = np.asarray(self.counts)
        if counts.shape != (n,):
            raise ValueError(f"counts must have shape ({n},), got {counts.shape}")
        object.__setattr__(self, "states", states)
        object.__setattr__(self, "deltas", deltas)
        object.__setattr__(self, "counts", counts)
        if self.init is not None:
            init = np.asarray(self.init, dtype=np.float32)
            if init.shape != (d,):
                raise ValueError(f"init must have shape ({d},), got {init.shape}")
            object.__setattr__(self, "init", init)
        if self.groups is not None:
            groups = np.asarray(self.groups)
            if groups.shape != (n,):
                raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
            object.__setattr__(self, "groups", groups)
        if self.prev_similarity is not None:
            prev = np.asarray(self.prev_similarity, dtype=np.float64)
            if prev.ndim not in (2, 3) or prev.shape[-2:] != (n, n):
                raise ValueError(
                    f"prev_similarity must have shape ({n}, {n}) or (G, {n}, {n}), got {prev.shape}"
                )
            object.__setattr__(self, "prev_similarity", prev)
        if self.signals is not None:
            sig = np.asarray(self.signals, dtype=np.float32)
            if sig.shape != (n, d):
                raise ValueError(f"signals must have shape ({n}, {d}), got {sig.shape}")
            object.__setattr__(self, "signals", sig)
        if self.memory is not None:
            mem = np.asarray(self.memory, dtype=np.float64)
            if mem.ndim != 2 or mem.shape[0] != n:
                raise ValueError(f"memory must have shape ({n}, M), got {mem.shape}")
            object.__setattr__(self, "memory", mem)

    @property
    def n(self) -> int:
        """Number of participants ``N``."""
        return int(self.states.shape[0])

    def theta(self) -> np.ndarray:
        """Fine-tuned parameters ``θ = states + deltas``: a new ``(N, D)`` float32 array."""
        return self.states + self.deltas

    def meta(self, layout: Layout | None = None) -> RoundMeta:
        """The round's :class:`RoundMeta` (``layout``: the whole adapter's, when this input
        holds a column block of it)."""
        return RoundMeta(self.n, self.counts, layout or self.layout, self.groups,
                         self.prev_similarity, self.memory)


@dataclass(frozen=True)
class RoundMeta:
    """What a strategy's :meth:`~Strategy.plan` sees besides the statistics: no ``(N, D)``
    array. ``layout`` is the whole adapter's; the other fields as in :class:`AggregationInput`.
    """

    n: int
    counts: np.ndarray
    layout: Layout
    groups: np.ndarray | None = None
    prev_similarity: np.ndarray | None = None
    memory: np.ndarray | None = None


@dataclass(frozen=True)
class Plan:
    """A round's aggregation plan: everything of :class:`AggregationResult` but the states.

    ``scale`` is a strategy's extra per-client coefficient vector ``(N,)`` (FedAWA: ``γ p``).
    """

    weights: np.ndarray
    similarity: np.ndarray | None = None
    layer_weights: np.ndarray | None = None
    layer_similarity: np.ndarray | None = None
    layer_names: tuple[str, ...] | None = None
    memory: np.ndarray | None = None
    scale: np.ndarray | None = None

    def weights_for(self, key: str) -> np.ndarray:
        """The ``(N, N)`` weights module ``key`` is aggregated with (its layer's, if any)."""
        if self.layer_names is not None and self.layer_weights is not None:
            return self.layer_weights[self.layer_names.index(key)]
        return self.weights

    def result(self, states: np.ndarray) -> AggregationResult:
        """The :class:`AggregationResult` of this plan with the next ``states``."""
        return AggregationResult(states=states, weights=self.weights, similarity=self.similarity,
                                 layer_weights=self.layer_weights,
                                 layer_similarity=self.layer_similarity,
                                 layer_names=self.layer_names, memory=self.memory)


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of one aggregation.

    Attributes:
        states: ``(N, D)`` float32 next personalized states.
        weights: ``(N, N)`` float64 aggregation weights (for layer-wise: mean over groups).
        similarity: ``(N, N)`` float64 similarity used, if any (layer-wise: mean over groups).
        layer_weights: ``(G, N, N)`` per-group weights (layer-wise only).
        layer_similarity: ``(G, N, N)`` per-group similarity (layer-wise only).
        layer_names: the ``G`` module keys (layer-wise only).
        memory: ``(N, M)`` float64 per-client memory to hand back next time each client
            takes part (:attr:`AggregationInput.memory`); None when the strategy keeps none.
    """

    states: np.ndarray
    weights: np.ndarray
    similarity: np.ndarray | None = None
    layer_weights: np.ndarray | None = None
    layer_similarity: np.ndarray | None = None
    layer_names: tuple[str, ...] | None = None
    memory: np.ndarray | None = None


@dataclass(frozen=True)
class ALAOptions:
    """FedALA's adaptive local aggregation (:mod:`.fedala`): after each aggregation every
    aggregated client learns element-wise weights ``W`` on ``rand_percent`` % of its train
    data for the last ``layer_idx`` parameter tensors (0 = all) with step ``eta``, until the
    std of the last ``num_pre_loss`` epoch losses is below ``threshold`` (its first time; then
    one epoch a round), and keeps ``θ + (g − θ) ⊙ W`` (``g`` elsewhere) as its state."""

    rand_percent: int = 80
    layer_idx: int = 2
    eta: float = 1.0
    threshold: float = 0.1
    num_pre_loss: int = 10


@dataclass(frozen=True)
class DPAOptions:
    """FedDPA's dual adapter (:mod:`.feddpa`): every client's model carries a second peft
    adapter ``local`` beside the global ``default``. Each round the local adapter trains with
    the global one frozen (adapter outputs weighted ``local_weight`` on local, the rest on
    global), then the global adapter alone; evaluation mixes them per instance, ``α(x)`` on
    local (``max_weight`` times the mean cosine to ``instance_num`` training instances)."""

    local_weight: float = 0.5
    max_weight: float = 0.5
    instance_num: int = 5


@dataclass(frozen=True)
class ClientOptions:
    """How clients train under a strategy.

    Attributes:
        prox_mu: coefficient of the proximal term ``mu/2 ||θ - θ̄||²`` (0 = off).
        finetune_epochs_before_eval: local epochs on the received model before evaluation.
        gate_mixes: validation gate (see :mod:`fedbip_ray.core.gate`): after aggregation each
            client keeps the best of ``local + λ (aggregate − local)`` over these ``λ`` on its
            validation split (empty = off: the aggregate is kept as is).
        gate_memory: weight per round of age of the gate's earlier evidence (0 = this round).
        gate_ties: how the gate breaks exact accuracy ties (``"aggregate"``, ``"loss"`` or
            ``"loss-se"``).
        send_gradient: clients also send the negated sum of their loss gradients over the
            round (``AggregationInput.signals``).
        ala: FedALA's adaptive local aggregation after each aggregation (None = off).
        dual_adapter: FedDPA's global and local adapters (None = one adapter).
    """

    prox_mu: float = 0.0
    finetune_epochs_before_eval: int = 0
    gate_mixes: tuple[float, ...] = ()
    gate_memory: float = 0.0
    gate_ties: str = "loss-se"
    send_gradient: bool = False
    ala: ALAOptions | None = None
    dual_adapter: DPAOptions | None = None


@runtime_checkable
class Strategy(Protocol):
    """What the server needs from a strategy."""

    name: ClassVar[str]

    @property
    def client_options(self) -> ClientOptions: ...

    def statistics(self, inp: AggregationInput) -> Any:
        """Additive statistics of a column block (None: the plan needs none); blocks'
        statistics combine with :func:`fedbip_ray.core.blocks.combine`."""
        ...

    def plan(self, stats: Any, meta: RoundMeta) -> Plan:
        """The round's :class:`Plan` from the combined statistics."""
        ...

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        """``(N, D_b)`` float32 next states of a column block ``inp``."""
        ...

    def aggregate(self, inp: AggregationInput) -> AggregationResult: ...


def run_strategy(strategy: Strategy, inp: AggregationInput) -> AggregationResult:
    """``strategy``'s three steps over one block holding every column of ``inp``."""
    plan = strategy.plan(strategy.statistics(inp), inp.meta())
    return plan.result(strategy.apply(inp, plan))
