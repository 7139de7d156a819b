"""Model + peft adapter factory (offline only).

``name`` may be an alias (``minilm``: the packaged all-MiniLM-L6-v2; ``tiny-bert``: a small
random-init BERT built from a config), a local directory, or a model id already in the local
Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fedbip_ray.config import ConfigError, ModelConfig
from fedbip_ray.models.adapter import wrap_adapter
from fedbip_ray.models.names import minilm_path, resolve_model_path, tiny_dims
from fedbip_ray.models.smollm2 import quiet_transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = str(minilm_path()) if cfg.name == "tiny-bert" else resolve_model_path(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"model.name '{cfg.name}': tokenizer not available offline "
                          f"({str(exc).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_base_model(cfg: ModelConfig, num_labels: int, vocab_size: int,
                    seed: int) -> torch.nn.Module:
    """The pretrained (or tiny random-init) classification model, without adapter."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    quiet_transformers()
    torch.manual_seed(seed)
    if cfg.name == "tiny-bert":
        bcfg = BertConfig(vocab_size=vocab_size, num_labels=num_labels, **tiny_dims(cfg))
        return BertForSequenceClassification(bcfg)
    path = resolve_model_path(cfg.name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except OSError as exc:
        raise ConfigError(f"model.name '{cfg.name}': not available offline "
                          f"({str(exc).splitlines()[0]})") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    return model


def wrap_peft(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with the configured adapter (LoRA or IA3); the classifier head is trained."""
    torch.manual_seed(seed + 1)
    pc = cfg.peft
    targets = list(pc.target_modules) if pc.target_modules else None
    save = list(pc.modules_to_save) if pc.modules_to_save else None
    if save is None and cfg.name == "tiny-bert":
        # a random-init model only learns if its embeddings train too
        save = ["classifier", "word_embeddings"]
    return wrap_adapter(model, pc, targets=targets, save=save, task_type="SEQ_CLS",
                        feedforward=[] if targets else None)


def add_adapter_copy(model: torch.nn.Module, name: str) -> None:
    """Give peft ``model`` a second adapter ``name`` with the config of ``default`` (its own
    LoRA factors and its own copy of every ``modules_to_save`` module), active beside
    ``default`` in every LoRA layer; the parameters of both adapters are trainable."""
    import copy

    from peft.tuners.lora import LoraLayer

    model.add_adapter(name, copy.deepcopy(model.peft_config["default"]))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(["default", name])
    for n, p in model.named_parameters():
        if {"default", name} & set(n.split(".")):
            p.requires_grad_(True)


def build_model(cfg: ModelConfig, num_labels: int, seed: int,
                base: torch.nn.Module | None = None) -> tuple[torch.nn.Module, Any]:
    """(peft model, tokenizer) for sequence classification, over ``base`` when given (e.g. a
    shared frozen base, :mod:`fedbip_ray.models.shared_base`), else over a fresh load."""
    tok = load_tokenizer(cfg)
    if base is None:
        base = load_base_model(cfg, num_labels, len(tok), seed)
    return wrap_peft(base, cfg, seed), tok
