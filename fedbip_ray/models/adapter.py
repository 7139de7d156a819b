"""The configured peft adapter (LoRA or IA3) put on a model: one builder for every model family."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fedbip_ray.config import ConfigError, PeftConfig


def wrap_adapter(model: torch.nn.Module, pc: PeftConfig, *, targets: list[str] | None,
                 save: list[str] | None, task_type: str | None = None,
                 feedforward: list[str] | None = None) -> torch.nn.Module:
    """``model`` wrapped with ``pc.method`` on ``targets`` (None: peft's defaults for the
    architecture), ``save`` trained in full; ``task_type`` a peft ``TaskType`` name
    (``"SEQ_CLS"``, ``"CAUSAL_LM"``; None for a plain module); ``feedforward`` IA3's
    feed-forward modules. peft's refusal (e.g. a target the model lacks) is a ConfigError."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    kind: dict[str, Any] = {"task_type": getattr(TaskType, task_type)} if task_type else {}
    if pc.method == "lora":
        pcfg: Any = LoraConfig(r=pc.r, lora_alpha=pc.alpha, lora_dropout=pc.dropout,
                               target_modules=targets, modules_to_save=save, **kind)
    else:
        pcfg = IA3Config(target_modules=targets, modules_to_save=save,
                         feedforward_modules=feedforward, **kind)
    try:
        with warnings.catch_warnings():  # peft probes a deprecated transformers attribute
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, pcfg)
    except ValueError as exc:
        raise ConfigError(f"model.peft: {str(exc).splitlines()[0]}") from None
