"""``model.task`` -> trainer. The trainers do not import this module."""

from __future__ import annotations

from typing import Any

from fedbip_ray.config import Config
from fedbip_ray.training.protocol import Trainer


def trainer_class(task: str) -> type[Any]:
    """The trainer class for a ``model.task`` (its module is imported on demand)."""
    if task == "causal-lm":
        from fedbip_ray.training.causal_lm import CausalLMTrainer

        return CausalLMTrainer
    if task == "image-classification":
        from fedbip_ray.training.image import ImageTrainer

        return ImageTrainer
    from fedbip_ray.training.sequence import SequenceTrainer

    return SequenceTrainer


def make_trainer(cfg: Config, num_labels: int, device: Any = None, base: Any = None) -> Trainer:
    """The trainer for ``cfg.model.task`` on ``device`` (a ``torch.device``; by default the one
    :func:`fedbip_ray.training.device.torch_device` picks from ``resources.device``), over the
    shared frozen weights of ``base`` (a :class:`~fedbip_ray.models.shared_base.FrozenBase`)
    when given and usable, else over a private copy."""
    return trainer_class(cfg.model.task)(cfg, num_labels, device, base)
