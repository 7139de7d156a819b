"""Device and precision choice of the trainers (no Ray actor: the actor passes Ray's answers)."""

from __future__ import annotations

import logging

import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.training.device import choose_device, resolve_precision

from ..conftest import tiny_config


def test_zero_assigned_gpus_is_cpu_even_with_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # Ray 2.60 leaves it set for num_gpus=0
    assert choose_device([], cuda_available=True, requested="auto", node_id="n1") == "cpu"
    assert choose_device([], cuda_available=False, requested="auto", node_id="n1") == "cpu"
    assert choose_device([0], cuda_available=True, requested="cpu", node_id="n1") == "cpu"


def test_assigned_and_visible_gpu_is_cuda_fractional_included():
    assert choose_device([0], cuda_available=True) == "cuda"
    assert choose_device(["1"], cuda_available=True, requested="cuda") == "cuda"
    assert choose_device(None, cuda_available=True) == "cuda"  # outside Ray: what torch sees
    assert choose_device(None, cuda_available=False) == "cpu"


def test_assigned_gpu_torch_cannot_see(caplog):
    with pytest.raises(ConfigError, match="node abc123") as err:
        choose_device([0], cuda_available=False, requested="cuda", node_id="abc123")
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fedbip_ray.training.device"):
        assert choose_device([0], cuda_available=False, requested="auto", node_id="abc123") == "cpu"
    assert "abc123" in caplog.text


def test_cuda_requested_without_an_assigned_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="node n7.*num_gpus_per_client"):
        choose_device([], cuda_available=True, requested="cuda", node_id="n7")


def test_precision_resolution():
    assert resolve_precision("auto", "cpu", bf16_supported=False) == "fp32"
    assert resolve_precision("auto", "cpu", bf16_supported=False, cpu_default="bf16") == "bf16"
    assert resolve_precision("auto", "cuda", bf16_supported=True) == "bf16"
    assert resolve_precision("auto", "cuda", bf16_supported=False) == "fp16"
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, "cpu", bf16_supported=False) == explicit


def test_config_fields_and_cpu_trainer_defaults():
    cfg = config_from_dict(tiny_config())
    assert cfg.resources.device == "auto" and cfg.train.precision == "auto"
    assert cfg.train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="resources.device"):
        config_from_dict(tiny_config(resources={"device": "tpu"}))
    with pytest.raises(ConfigError, match="train.precision"):
        config_from_dict(tiny_config(train={"precision": "fp8"}))


def test_trainers_resolve_to_fp32_on_cpu_except_causal_lm():
    torch = pytest.importorskip("torch")
    from fedbip_ray.training.registry import make_trainer

    seq = make_trainer(config_from_dict(tiny_config()), 2, torch.device("cpu"))
    assert seq.device.type == "cpu" and seq.precision == "fp32"
    lm_cfg = config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm",
                                         "max_length": 32,
                                         "tiny": {"hidden_size": 16, "num_layers": 1,
                                                  "num_heads": 2,
                                                  "intermediate_size": 32}},
                               "data": {"dataset": "instruct-tasks"}})
    lm = make_trainer(lm_cfg, 6, torch.device("cpu"))
    assert lm.precision == "bf16"  # bf16 autocast on CPU, as before train.precision existed
    lm32 = make_trainer(lm_cfg.model_copy(update={"train": lm_cfg.train.model_copy(
        update={"precision": "fp32"})}), 6, torch.device("cpu"))
    assert lm32.precision == "fp32"


def _lm_cfg(**train):
    return config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm", "max_length": 64,
                                       "tiny": {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                                "intermediate_size": 32}},
                             "data": {"dataset": "instruct-tasks"},
                             "train": {"batch_size": 4, "lr": 0.05, "precision": "fp32", **train}})


def test_gradient_checkpointing_trains_the_same_adapter():
    torch = pytest.importorskip("torch")
    import numpy as np

    from fedbip_ray.data import instruct as I
    from fedbip_ray.training.registry import make_trainer

    frame = (I.build_instruct_frame(seed=3, per_task=60).groupby("task").head(1)
             .reset_index(drop=True))
    states = []
    for checkpointing in (False, True):
        tr = make_trainer(_lm_cfg(gradient_checkpointing=checkpointing), 6, torch.device("cpu"))
        assert tr.model.get_base_model().is_activation_checkpointing == checkpointing
        tr.train(tr.encode(frame), 1, seed=0)
        states.append(tr.current_state())
    assert np.allclose(states[0], states[1], atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_sums_unscaled_gradients(precision):
    torch = pytest.importorskip("torch")
    import numpy as np
    import pandas as pd

    from fedbip_ray.training.registry import make_trainer

    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "great", "awful"]
    frame = pd.DataFrame({"text": [" ".join(rng.choice(words, 6)) for _ in range(16)],
                          "label": rng.integers(0, 2, 16)})
    signals = {}
    for p in ("fp32", precision):
        cfg = config_from_dict(tiny_config(train={"batch_size": 8, "lr": 0.05, "precision": p}))
        tr = make_trainer(cfg, 2, torch.device("cpu"))
        assert tr.precision == p
        tr.start_gradient_sum()
        metrics = tr.train(tr.encode(frame), 1, seed=3)
        signals[p] = tr.stop_gradient_sum()
        assert metrics["steps"] == 2 and np.isfinite(metrics["train_loss"])
        assert np.isfinite(tr.evaluate(tr.encode(frame))["loss"])
    a, b = signals["fp32"], signals[precision]
    assert 0.5 < np.linalg.norm(b) / np.linalg.norm(a) < 2.0  # unscaled (fp16 loss scale is 2**16)
    assert float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.8
