"""A pretrained model that is not an alias: a directory written by ``save_pretrained`` (model
and tokenizer), and the same model in a Hugging Face cache under its hub id, read offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedbip_ray.config import config_from_dict
from fedbip_ray.data.datasets import _NEG, _NEU, _POS
from fedbip_ray.runtime.federation import run_federation

from ..conftest import REPO, tiny_config

pytestmark = pytest.mark.ray

HIDDEN = 20  # not the tiny-bert alias's width: the layout shows which model was loaded
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + sorted(set(_NEU) | set(_POS) | set(_NEG))
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def save_tiny_bert(directory: Path) -> Path:
    """A random-init BERT (hidden ``HIDDEN``) and its WordPiece tokenizer over the synthetic
    corpus' words, saved as ``from_pretrained`` expects them."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    assert len(tok) == len(VOCAB)
    tok.save_pretrained(str(directory))
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(str(directory))
    return directory


def _config(name: str) -> dict:
    return tiny_config(
        model={"name": name, "max_length": 24,
               "peft": {"r": 4, "alpha": 8, "dropout": 0.0,
                        "modules_to_save": ["classifier", "word_embeddings"]}},
        federation={"rounds": 1})


def _layout(out: Path) -> dict[str, list[int]]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    lay = json.loads((out / "checkpoints" / latest["path"] / "layout.json").read_text())
    return dict(zip(lay["names"], lay["shapes"], strict=True))


def _assert_the_saved_model_trained(out: Path, summary: dict) -> None:
    assert summary["rounds_completed"] == 1
    assert 0 <= summary["mean_accuracy"] <= 1
    shapes = _layout(out)
    emb = [s for n, s in shapes.items() if "word_embeddings" in n]
    assert emb == [[len(VOCAB), HIDDEN]]  # the saved tokenizer's vocabulary, the saved width
    lora = [s for n, s in shapes.items() if "lora_A" in n]
    assert lora and all(s == [4, HIDDEN] for s in lora)


def test_a_model_directory_trains(ray_local, tmp_path):
    model = save_tiny_bert(tmp_path / "my-bert")
    cfg = config_from_dict(_config(str(model)))
    out = tmp_path / "out"
    summary = run_federation(cfg, out, echo=lambda s: None)
    _assert_the_saved_model_trained(out, summary)


def hub_cache(root: Path, repo_id: str, model: Path) -> Path:
    """``model``'s files under ``root`` in the hub cache layout (blobs, a snapshot of links,
    refs/main)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / SNAPSHOT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in model.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return root


def test_a_model_in_the_hub_cache_trains_offline(tmp_path):
    """``fedbip run`` (its own embedded Ray, which inherits the environment) with
    ``model.name: org/name`` found in ``HF_HUB_CACHE`` and nothing downloaded."""
    model = save_tiny_bert(tmp_path / "saved")
    cache = hub_cache(tmp_path / "hub", "tinyorg/tiny-bert-test", model)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_config("tinyorg/tiny-bert-test")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    out = tmp_path / "out"
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "fedbip"), "run", str(tmp_path / "c.yaml"),
                           "--output", str(out), "--quiet"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_the_saved_model_trained(out, json.loads((out / "summary.json").read_text()))
    assert not (tmp_path / "hf-home" / "hub").exists()  # only the given cache was used
