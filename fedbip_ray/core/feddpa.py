"""FedDPA (Yang et al., NeurIPS 2024): a global and a local adapter per client, mixed per
instance at inference.

The model carries two peft adapters: ``default`` (global, trained and averaged as FedAvg) and
``local`` (each client's own). One flat state holds both (their parameter names differ in the
adapter segment, ``...lora_A.default.weight`` / ``...lora_A.local.weight``; the classifier
head and any other ``modules_to_save`` have one copy per adapter), so the server rule is
partial sharing: the global adapter's columns are averaged, the local adapter's stay the
client's own (whole modules: any column block of whole modules works).

Each round a client trains as the authors' ``main.py`` (FedDPA-T, ``local_model=True``):
first the local adapter with the global one frozen and both active, every adapted module's
output ``local_weight · local + (1 − local_weight) · global`` (the global branch detached);
then the global adapter alone. The local phase starts once the global adapter has been
trained (the authors skip it in the first round). Its task vector spans both adapters.

At inference an instance ``x`` is answered with every adapted module's output
``(1 − α(x))·global + α(x)·local`` where ``α(x) = max_weight · mean_j cos(e(x), e(x_j))``
over ``instance_num`` random training instances ``x_j`` of the client and ``e`` the
local-adapter model's last hidden state (the authors' ``GlobalModel_generated.py``,
``get_weight``: ``max_weight`` 0.5, 5 instances). α weights the local adapter, as this
method intends (the more like the client's own data, the more local); the released script's
``set_local(['local'], [w, 1 - w])``, called with the global adapter active, puts ``w`` on
the global adapter instead. The torch side: :mod:`fedbip_ray.training.dpa`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .interface import (
    AggregationInput,
    AggregationResult,
    ClientOptions,
    DPAOptions,
    Plan,
    RoundMeta,
    run_strategy,
)
from .params import Check, param
from .taskvector import Layout
from .weights import fedavg_weights

__all__ = ["FedDPAStrategy", "adapter_columns", "instance_weights"]

GLOBAL_ADAPTER = "default"
LOCAL_ADAPTER = "local"


def adapter_columns(layout: Layout, adapter: str) -> np.ndarray:
    """int64 indices of the parameters of peft adapter ``adapter`` (a name segment equal to
    it, e.g. ``lora_A.default.weight`` or ``modules_to_save.default.bias``)."""
    parts = [np.arange(layout.index(n).start, layout.index(n).stop, dtype=np.int64)
             for n in layout.names if adapter in n.split(".")]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def instance_weights(test: np.ndarray, refs: np.ndarray, max_weight: float) -> np.ndarray:
    """``(n,)`` float64 local-adapter weight per instance: ``max_weight`` times the mean
    cosine between ``test`` ``(n, h)`` and its ``k`` references ``refs`` ``(n, k, h)`` (zero
    vectors count as cosine 0; not clipped, as in the authors' code)."""
    t = np.asarray(test, dtype=np.float64)
    r = np.asarray(refs, dtype=np.float64)
    tn = np.linalg.norm(t, axis=-1)[:, None]
    rn = np.linalg.norm(r, axis=-1)
    dots = np.einsum("nh,nkh->nk", t, r)
    cos = np.divide(dots, tn * rn, out=np.zeros_like(dots), where=(tn * rn) > 0)
    return max_weight * cos.mean(axis=1)


@dataclass(frozen=True)
class FedDPAStrategy:
    """FedDPA's server rule with the authors' inference defaults.

    Attributes:
        local_weight: the global adapter's share while the local adapter trains (authors:
            ``local_weight=0.5``, both adapters weighted 0.5).
        max_weight: ``α``'s scale at inference (authors: 0.5, ``half=True``).
        instance_num: training instances each test instance is compared with (authors: 5).
    """

    name: ClassVar[str] = "feddpa"
    local_weight: float = param(0.5, Check("number", ge=0, le=1))
    max_weight: float = param(0.5, Check("number", gt=0, le=1))
    instance_num: int = param(5, Check("integer", ge=1, le=10_000))

    @property
    def client_options(self) -> ClientOptions:
        return ClientOptions(dual_adapter=DPAOptions(self.local_weight, self.max_weight,
                                                     self.instance_num))

    def statistics(self, inp: AggregationInput) -> None:
        return None

    def plan(self, stats: None, meta: RoundMeta) -> Plan:
        if adapter_columns(meta.layout, LOCAL_ADAPTER).size == 0:
            raise ValueError("strategy 'feddpa' needs a second peft adapter named 'local' in "
                             "the model; the layout has none")
        return Plan(fedavg_weights(meta.counts))

    def apply(self, inp: AggregationInput, plan: Plan) -> np.ndarray:
        """The global adapter's columns averaged (example-weighted), the rest own."""
        states = inp.theta()
        cols = np.setdiff1d(np.arange(inp.layout.size), adapter_columns(inp.layout,
                                                                         LOCAL_ADAPTER))
        if cols.size:
            states[:, cols] = (plan.weights[0] @ states[:, cols].astype(np.float64)
                               ).astype(np.float32)
        return states

    def aggregate(self, inp: AggregationInput) -> AggregationResult:
        return run_strategy(self, inp)
