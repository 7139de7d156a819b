"""Newcomers' data for ``fedbip join``: read a table with the run's data columns, one newcomer
per value of a client column (else one), labels mapped onto the run's, split and written as
shards the client actors read (same columns and splits as the run's own shards)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.data import partition as P
from fedbip_ray.data.datasets import read_table
from fedbip_ray.data.shards import ShardSet

SHARD_COLUMNS = ("text", "label", "group", "split")  # every shard has these; others are extras


@dataclass(frozen=True)
class Newcomer:
    """One joining client: ``name`` (its client-column value, or ``newcomer``), the id it trains
    under (after the run's clients) and its rows (columns ``text``, ``label`` + extras)."""

    name: str
    client_id: int
    frame: pd.DataFrame


@dataclass(frozen=True)
class NewcomerShard:
    """Where a newcomer's shard was written and its split sizes."""

    newcomer: Newcomer
    path: Path
    train: int
    val: int
    test: int


def run_extras(shards: ShardSet) -> tuple[str, ...]:
    """Dataset-specific columns of the run's shards (e.g. prompt/response/task), in order."""
    if not shards.paths or not shards.paths[0].is_file():
        return ()
    names = pq.read_schema(shards.paths[0]).names
    return tuple(c for c in names if c not in SHARD_COLUMNS)


def _labels(values: pd.Series, names: tuple[str, ...], column: str, path: str) -> np.ndarray:
    """``values`` as the run's label ids: by label name, else as integers in ``[0, K)``."""
    if values.isna().any():
        raise ConfigError(f"join --data {path}: label column '{column}' has missing values")
    text = values.astype(str)
    index = {n: i for i, n in enumerate(names)}
    if text.isin(list(index)).all():
        return text.map(index).to_numpy(dtype=np.int64)
    as_int = pd.to_numeric(values, errors="coerce")
    if as_int.notna().all() and (as_int % 1 == 0).all() and as_int.between(0, len(names) - 1).all():
        return as_int.to_numpy(dtype=np.int64)
    bad = sorted(set(text) - set(index))[:3]
    raise ConfigError(f"join --data {path}: label column '{column}' holds {bad}, not the run's "
                      f"labels {list(names)} (or their ids 0..{len(names) - 1})")


def _require(raw: pd.DataFrame, need: list[str], path: str | Path) -> None:
    missing = [c for c in need if c not in raw.columns]
    if missing:
        raise ConfigError(f"join --data {path}: columns {missing} missing; the run's data has "
                          f"{need} (file columns: {[str(c) for c in raw.columns]})")


def _classification_frame(raw: pd.DataFrame, cfg: Config, shards: ShardSet,
                          path: str | Path) -> pd.DataFrame:
    """Columns ``text``, ``label`` (the run's label ids) and the run's extras."""
    frame = pd.DataFrame({"text": raw[cfg.data.text_column].astype(str).to_numpy(),
                          "label": _labels(raw[cfg.data.label_column], shards.label_names,
                                           cfg.data.label_column, str(path))})
    for extra in run_extras(shards):
        frame[extra] = raw[extra].to_numpy()
    return frame


def _generative_frame(raw: pd.DataFrame, cfg: Config, shards: ShardSet,
                      path: str | Path) -> pd.DataFrame:
    """The trainer's generative columns (prompt, response, turns, task, metric) read with the
    run's data.prompt_column / messages_column / task_column; ``label`` is the task's index
    among the run's tasks (-1 for a task the run has not seen)."""
    from fedbip_ray.data.own import generative_frame

    frame, names = generative_frame(raw, cfg.data.model_copy(update={"path": str(path)}),
                                    check_metrics=False)
    index = {n: i for i, n in enumerate(shards.label_names)}
    frame["label"] = [index.get(str(names[y]), -1) for y in frame["label"]]
    frame["label"] = frame["label"].astype("int64")
    missing = [c for c in run_extras(shards) if c not in frame.columns]
    if missing:
        raise ConfigError(f"join --data {path}: the run's shards have columns {missing} that "
                          "its data.prompt_column / messages_column settings do not give")
    return frame[["text", "label", *run_extras(shards)]]


def read_newcomers(path: str | Path, cfg: Config, shards: ShardSet,
                   client_column: str | None = None) -> list[Newcomer]:
    """The newcomers in the table at ``path`` (Parquet, CSV or JSON lines).

    The table must have the run's data columns: ``data.text_column`` and ``data.label_column``
    plus the run's extra shard columns, or for generative data the run's prompt/response (or
    messages) and task columns; raises :class:`ConfigError` (one line) otherwise, or when it
    is empty.
    """
    if not Path(path).is_file():
        raise ConfigError(f"join --data {path}: file not found")
    raw = read_table(Path(path))
    extra = [client_column] if client_column else []
    if cfg.data.generative:
        _require(raw, extra, path)
    else:
        _require(raw, [cfg.data.text_column, cfg.data.label_column, *run_extras(shards), *extra],
                 path)
        raw = raw.dropna(subset=[cfg.data.text_column])
    if raw.empty:
        raise ConfigError(f"join --data {path}: no rows")
    frame = (_generative_frame if cfg.data.generative else _classification_frame)(
        raw, cfg, shards, path)
    if not client_column:
        return [Newcomer("newcomer", shards.num_clients, frame)]
    keys = raw[client_column].astype(str).to_numpy()
    return [Newcomer(str(key), shards.num_clients + j, frame[keys == key].reset_index(drop=True))
            for j, key in enumerate(dict.fromkeys(keys))]


def newcomer_dirname(newcomer: Newcomer) -> str:
    """A file-system-safe directory name for a newcomer (its id plus its name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", newcomer.name).strip("-.")[:40]
    return f"newcomer_{newcomer.client_id:05d}" + (f"_{safe}" if safe else "")


def write_newcomer_shard(newcomer: Newcomer, cfg: Config, directory: Path) -> NewcomerShard:
    """Split the newcomer's rows like the run's clients (``data.val_fraction`` /
    ``data.test_fraction``, seeded by run seed and client id) and write its shard."""
    idx = np.arange(len(newcomer.frame))
    train, val, test = P.split_client(idx, cfg.data.val_fraction, cfg.data.test_fraction,
                                      cfg.seed * 100_003 + newcomer.client_id)
    if len(train) == 0:
        raise ConfigError(f"join: newcomer '{newcomer.name}' has {len(idx)} rows, too few for a "
                          "training split (data.val_fraction / data.test_fraction)")
    rows = np.concatenate([train, val, test])
    part = newcomer.frame.iloc[rows].reset_index(drop=True)
    columns = {c: part[c].to_numpy() for c in part.columns}
    columns["text"] = part["text"].astype(str).to_numpy()
    columns["group"] = np.full(len(rows), -1, dtype=np.int64)
    columns["split"] = ["train"] * len(train) + ["val"] * len(val) + ["test"] * len(test)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{newcomer_dirname(newcomer)}.parquet"
    pq.write_table(pa.table(columns), path)
    return NewcomerShard(newcomer, path, len(train), len(val), len(test))


def stored_counts(shards: ShardSet) -> np.ndarray:
    """``(N,)`` training example counts of the run's clients (from ``clients.json``)."""
    return np.asarray([int(c.get("train", 1)) for c in shards.summary], dtype=np.int64)


def write_json(path: Path, obj: object) -> None:
    """``obj`` as indented JSON (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(obj), indent=1))


def _nan_to_none(obj: object) -> object:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj
