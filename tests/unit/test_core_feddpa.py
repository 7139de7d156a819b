"""FedDPA's server rule and instance weights (core, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.core.feddpa import FedDPAStrategy, adapter_columns, instance_weights
from fedbip_ray.core.params import check_params
from fedbip_ray.core.strategies import AggregationInput
from fedbip_ray.core.taskvector import Layout

LAYOUT = Layout.from_shapes({
    "m.q.lora_A.default.weight": (2,), "m.q.lora_A.local.weight": (2,),
    "classifier.modules_to_save.default.bias": (1,),
    "classifier.modules_to_save.local.bias": (1,),
})


def test_adapter_columns_by_name_segment() -> None:
    want = [c for n in LAYOUT.names if ".local." in n
            for c in range(LAYOUT.index(n).start, LAYOUT.index(n).stop)]
    assert adapter_columns(LAYOUT, "local").tolist() == want and len(want) == 3
    both = np.concatenate([adapter_columns(LAYOUT, "default"), adapter_columns(LAYOUT, "local")])
    assert sorted(both.tolist()) == list(range(LAYOUT.size))


def test_global_adapter_averaged_local_adapter_own_by_hand() -> None:
    deltas = np.stack([np.full(LAYOUT.size, 1.0), np.full(LAYOUT.size, 5.0)]).astype(np.float32)
    inp = AggregationInput(states=np.zeros_like(deltas), deltas=deltas, counts=np.array([3, 1]),
                           layout=LAYOUT)
    res = FedDPAStrategy().aggregate(inp)
    glob, loc = adapter_columns(LAYOUT, "default"), adapter_columns(LAYOUT, "local")
    assert np.all(res.states[:, glob] == 2.0)  # 3/4 * 1 + 1/4 * 5
    assert np.all(res.states[0, loc] == 1.0) and np.all(res.states[1, loc] == 5.0)


def test_feddpa_needs_a_local_adapter() -> None:
    lay = Layout.from_shapes({"m.q.lora_A.default.weight": (2,)})
    inp = AggregationInput(states=np.zeros((1, 2), np.float32),
                           deltas=np.zeros((1, 2), np.float32), counts=np.array([1]), layout=lay)
    with pytest.raises(ValueError, match="second peft adapter named 'local'"):
        FedDPAStrategy().aggregate(inp)


def test_instance_weights_by_hand() -> None:
    test = np.array([[1.0, 0.0], [0.0, 2.0]])
    refs = np.array([[[1.0, 0.0], [0.0, 3.0]],     # cos 1 and 0 -> mean 0.5
                     [[0.0, -1.0], [0.0, 0.0]]])   # cos -1 and (zero vector) 0 -> -0.5
    assert np.allclose(instance_weights(test, refs, 0.5), [0.25, -0.25])


def test_feddpa_params_checked_one_line() -> None:
    assert check_params(FedDPAStrategy, {"max_weight": 1}, "feddpa") == {"max_weight": 1.0}
    with pytest.raises(ValueError, match=r"local_weight must be in \[0, 1\], got 2") as err:
        check_params(FedDPAStrategy, {"local_weight": 2}, "feddpa")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="instance_num"):
        check_params(FedDPAStrategy, {"instance_num": 0}, "feddpa")


def test_both_adapters_of_a_module_stay_in_one_block() -> None:
    """The sorted layout interleaves the adapters (``lora_A.default``, ``lora_A.local``,
    ``lora_B.default``, ...); a server split into column blocks keeps each module whole and
    computes the one-block result."""
    from fedbip_ray.core.blocks import split_layout

    lay = Layout.from_shapes({f"m.{q}.{s}.{a}.weight": (2,) for q in ("q", "v")
                              for s in ("lora_A", "lora_B") for a in ("default", "local")})
    blocks = split_layout(lay, 2)
    assert [b.layout.names[0] for b in blocks] == ["m.q.lora_A.default.weight",
                                                   "m.v.lora_A.default.weight"]
    rng = np.random.default_rng(0)
    deltas = rng.standard_normal((3, lay.size)).astype(np.float32)
    inp = AggregationInput(states=np.zeros_like(deltas), deltas=deltas,
                           counts=np.array([1, 2, 3]), layout=lay)
    s = FedDPAStrategy()
    whole = s.aggregate(inp).states
    plan = s.plan(None, inp.meta())
    parts = [s.apply(AggregationInput(states=inp.states[:, b.cols], deltas=deltas[:, b.cols],
                                      counts=inp.counts, layout=b.layout), plan)
             for b in blocks]
    assert np.array_equal(np.concatenate(parts, axis=1), whole)
