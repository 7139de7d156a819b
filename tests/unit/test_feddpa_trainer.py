"""FedDPA on the tiny-bert trainer: both adapters in the layout, the two training phases, the
per-instance mixing of the adapters at evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.core.feddpa import adapter_columns

from ..conftest import tiny_config

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trainer_and_data():
    import pandas as pd

    from fedbip_ray.training.sequence import SequenceTrainer

    cfg = config_from_dict(tiny_config(strategy={"name": "feddpa"},
                                       train={"local_epochs": 1}))
    tr = SequenceTrainer(cfg, num_labels=2)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    frame = pd.DataFrame({"text": [" ".join(rng.choice(words, 5)) for _ in range(24)],
                          "label": rng.integers(0, 2, 24)})
    return tr, tr.encode(frame)


def _distinct_adapters(tr) -> np.ndarray:
    """A state whose global and local adapters differ (both away from their init)."""
    rng = np.random.default_rng(1)
    state = tr.initial_state()
    return state + rng.standard_normal(state.shape).astype(np.float32) * 0.3


def test_layout_holds_both_adapters_and_a_head_each(trainer_and_data) -> None:
    tr, _ = trainer_and_data
    glob, loc = adapter_columns(tr.layout, "default"), adapter_columns(tr.layout, "local")
    assert glob.size == loc.size > 0 and glob.size + loc.size == tr.layout.size
    heads = [n for n in tr.layout.names if ".classifier." in n]
    assert sorted(heads) == sorted(f"base_model.model.classifier.modules_to_save.{a}.{p}"
                                   for a in ("default", "local") for p in ("bias", "weight"))
    assert any(".lora_A.local." in n for n in tr.layout.names)


def test_mixed_prediction_is_neither_adapter_alone(trainer_and_data) -> None:
    from fedbip_ray.training.sequence import text_batches

    tr, data = trainer_and_data
    tr.load_state(_distinct_adapters(tr))
    tr.model.eval()
    inputs, _ = next(text_batches(data, 8, None, tr.device))
    with torch.no_grad():
        with tr.mix.use({"default": 1.0, "local": 0.0}):
            only_global = tr.logits(inputs)
        with tr.mix.use({"default": 0.0, "local": 1.0}):
            only_local = tr.logits(inputs)
        half = tr.mixed_logits(inputs, torch.full((8,), 0.5))
        rows = tr.mixed_logits(inputs, torch.tensor([0.0, 1.0] * 4))
    assert not torch.allclose(only_global, only_local, atol=1e-4)
    assert (half - only_global).abs().max() > 1e-4 and (half - only_local).abs().max() > 1e-4
    # mixed in every layer, not the two models' logits averaged
    assert (half - (only_global + only_local) / 2).abs().max() > 1e-4
    # per-row weights: row 0 the global adapter alone, row 1 the local one
    assert torch.allclose(rows[0::2], only_global[0::2], atol=1e-5)
    assert torch.allclose(rows[1::2], only_local[1::2], atol=1e-5)


def test_evaluation_weighs_each_instance_against_training_instances(trainer_and_data) -> None:
    tr, data = trainer_and_data
    tr.load_state(_distinct_adapters(tr))
    with pytest.raises(ValueError, match="per instance against the client's training"):
        tr.evaluate(data)
    alpha = tr.instance_alphas(data, data, seed=3)
    assert alpha.shape == (len(data),) and np.all(np.abs(alpha) <= 0.5 + 1e-9)
    assert np.ptp(alpha) > 0  # one weight per instance
    assert np.array_equal(alpha, tr.instance_alphas(data, data, seed=3))
    scores = tr.evaluate(data, data, seed=3)
    assert scores == tr.mixed_eval(data, alpha) and scores["n"] == len(data)
    assert scores != tr.mixed_eval(data, np.zeros(len(data)))


def test_two_phases_local_then_global(trainer_and_data) -> None:
    tr, data = trainer_and_data
    glob, loc = adapter_columns(tr.layout, "default"), adapter_columns(tr.layout, "local")
    start = tr.initial_state()
    tr.load_state(start)
    first = tr.train(data, 1, seed=0)
    after = tr.current_state()
    # the global adapter untrained yet: the global phase only (the authors' first round)
    assert first["steps"] == 2 and np.array_equal(after[loc], start[loc])
    assert not np.array_equal(after[glob], start[glob])
    second = tr.train(data, 1, seed=1)
    again = tr.current_state()
    assert second["steps"] == 4 and np.isfinite(second["train_loss"])
    assert not np.array_equal(again[loc], after[loc])
    assert not np.array_equal(again[glob], after[glob])
    assert all(p.requires_grad for p in tr.params.values())


def test_global_phase_does_not_see_the_local_adapter(trainer_and_data) -> None:
    """The global phase trains as the global adapter alone: the same as from a state whose
    local adapter is another (only the local phase reads it)."""
    tr, data = trainer_and_data
    loc = adapter_columns(tr.layout, "local")
    base = tr.initial_state()
    other = base.copy()
    other[loc] += 0.5
    ends = []
    for s in (base, other):
        tr.load_state(s)
        tr.train(data, 1, seed=0)
        ends.append(np.delete(tr.current_state(), loc))
    assert np.array_equal(ends[0], ends[1])


@pytest.mark.parametrize(("section", "match"), [
    ({"model": {"task": "causal-lm", "name": "tiny-llama"},
      "data": {"dataset": "instruct-tasks", "partition": {"kind": "column"}}},
     "feddpa' mixes its global"),
    ({"model": {"peft": {"method": "ia3"}}}, "needs model.peft.method 'lora'"),
])
def test_feddpa_config_errors_one_line(section, match) -> None:
    with pytest.raises((ConfigError, ValueError), match=match) as err:
        config_from_dict(tiny_config(strategy={"name": "feddpa"}, **section))
    assert "\n" not in str(err.value).strip()
