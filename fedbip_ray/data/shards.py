"""Per-client Parquet shards: written once by the driver, each read only by its own client.

Layout of a shard directory: ``client_XXXXX.parquet`` per client (:func:`shard_path`) and
``clients.json`` (label names, per-client summary); :meth:`ShardSet.load` is its one reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedbip_ray.config import ConfigError, DataConfig
from fedbip_ray.data import partition as P
from fedbip_ray.data.datasets import LoadedDataset, load_dataset

CLIENTS_FILE = "clients.json"


def shard_path(directory: str | Path, client: int) -> Path:
    """Where client ``client``'s shard lives in a shard directory."""
    return Path(directory) / f"client_{int(client):05d}.parquet"


@dataclass(frozen=True)
class ShardSet:
    """Where the shards are and what they hold."""

    directory: Path
    paths: tuple[Path, ...]  # one Parquet file per client, columns text/label/split
    groups: tuple[int, ...]  # (num_clients,) group of each client (0 when ungrouped)
    label_names: tuple[str, ...]
    summary: tuple[dict, ...]

    @classmethod
    def load(cls, directory: str | Path) -> ShardSet:
        """The shards :func:`build_shards` wrote into ``directory`` (ConfigError, one line,
        when its ``clients.json`` is missing or unreadable)."""
        d = Path(directory)
        try:
            meta = json.loads((d / CLIENTS_FILE).read_text())
            summary = tuple(meta["clients"])
            groups = tuple(int(c["group"]) for c in summary)
            paths = tuple(shard_path(d, int(c["client"])) for c in summary)
            labels = tuple(str(n) for n in meta["label_names"])
        except FileNotFoundError:
            raise ConfigError(f"shards '{d}': {CLIENTS_FILE} not found") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"shards '{d}': {CLIENTS_FILE} unreadable "
                              f"({type(exc).__name__})") from None
        return cls(d, paths, groups, labels, summary)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_clients(self) -> int:
        return len(self.paths)


def partition_dataset(ds: LoadedDataset, cfg: DataConfig,
                      seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Row indices per client and each client's group, as the config asks."""
    n, k = len(ds.frame), cfg.num_clients
    per = cfg.examples_per_client
    need = k * (per or 4)
    if need > n:
        raise ConfigError(
            f"data.num_clients: {k} clients x {per or 4} examples need {need} examples, "
            f"dataset '{cfg.dataset}' has {n}"
        )
    kind = cfg.partition.kind
    if kind == "column":
        if "client" not in ds.frame.columns:
            raise ConfigError("data.partition.kind 'column' needs data.client_column "
                              "(or a dataset with one)")
        parts, groups = P.by_column(ds.frame["client"].to_numpy(), k, per, seed)
        empty = [i for i, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise ConfigError(f"data.num_clients: client {empty[0]} gets no examples "
                              "from column partition")
        if ds.group_keys is not None:  # the true groups the user gave (data.group_column)
            groups = P.groups_of_clients(parts, ds.group_keys)
    elif kind == "pathological":
        parts, groups = P.pathological(ds.frame["label"].to_numpy(), k,
                                       cfg.partition.classes_per_client, per, seed)
    elif kind == "dirichlet":
        parts = P.dirichlet(ds.frame["label"].to_numpy(), k, cfg.partition.alpha, per, seed)
        groups = np.zeros(k, dtype=np.int64)
    else:
        parts = P.iid(n, k, per, seed)
        groups = (P.assign_groups(k, cfg.partition.num_groups) if kind == "groups"
                  else np.zeros(k, dtype=np.int64))
    return parts, groups


def split_of_client(ds: LoadedDataset, cfg: DataConfig, idx: np.ndarray, seed: int,
                    cid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices of client ``cid``: the user's split (data.split_column)
    when there is one, else a seeded random split; ConfigError when a client has no train or
    no test rows."""
    if ds.splits is None:
        train, val, test = P.split_client(idx, cfg.val_fraction, cfg.test_fraction, seed)
        if len(train) == 0:
            raise ConfigError(f"data.examples_per_client: client {cid} has no training examples")
        return train, val, test
    train, val, test = P.split_given(idx, ds.splits)
    for name, rows in (("train", train), ("test", test)):
        if len(rows) == 0:
            natural = "client" in ds.frame.columns and len(idx)
            key = f" ('{ds.frame['client'].iat[int(idx[0])]}')" if natural else ""
            raise ConfigError(f"data.split_column: client {cid}{key} has no {name} rows "
                              f"(value '{cfg.split_values[name]}' in column '{cfg.split_column}')")
    return train, val, test


def build_shards(cfg: DataConfig, seed: int, directory: str | Path) -> ShardSet:
    """Load, partition, shift labels per group, split and write ``client_XXXXX.parquet`` files.

    Also writes ``clients.json`` (per-client sizes, label histogram, group).
    """
    ds = load_dataset(cfg, seed)
    parts, groups = partition_dataset(ds, cfg, seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text = ds.frame["text"].to_numpy()
    labels = ds.frame["label"].to_numpy()
    shifted = cfg.partition.kind == "groups" and cfg.partition.shift == "label-flip"
    extras = [c for c in ds.frame.columns if c not in ("text", "label", "client")]
    paths, summary = [], []
    for cid, idx in enumerate(parts):
        train, val, test = split_of_client(ds, cfg, idx, seed * 100_003 + cid, cid)
        rows = np.concatenate([train, val, test])
        y = labels[rows]
        if shifted:
            y = P.shift_labels(y, int(groups[cid]), ds.num_labels)
        split = ["train"] * len(train) + ["val"] * len(val) + ["test"] * len(test)
        columns = {"text": text[rows].astype(str), "label": y.astype(np.int64)}
        for extra in extras:  # dataset-specific columns (e.g. prompt/response/task) travel along
            columns[extra] = ds.frame[extra].to_numpy()[rows]
        columns["group"] = np.full(len(rows), int(groups[cid]), dtype=np.int64)
        columns["split"] = split
        table = pa.table(columns)
        path = shard_path(out, cid)
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        paths.append(path)
        summary.append(
            {
                "client": cid,
                "group": int(groups[cid]),
                "train": len(train),
                "val": len(val),
                "test": len(test),
                "label_histogram": np.bincount(y, minlength=ds.num_labels).tolist(),
            }
        )
    meta = {"label_names": list(ds.label_names), "clients": summary}
    (out / CLIENTS_FILE).write_text(json.dumps(meta, indent=1))
    return ShardSet(out, tuple(paths), tuple(int(g) for g in groups), ds.label_names,
                    tuple(summary))


def read_shard(data: bytes | str | Path) -> dict[str, pd.DataFrame]:
    """One client's shard (Parquet bytes or path) -> {"train"|"val"|"test": DataFrame}."""
    source = pa.BufferReader(data) if isinstance(data, bytes | bytearray) else str(data)
    frame = pq.read_table(source).to_pandas()
    return {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}


def format_summary(summary: tuple[dict, ...], limit: int = 20) -> str:
    """A small table of the per-client summary (first ``limit`` clients)."""
    lines = ["client group  train  val  test  labels"]
    for row in summary[:limit]:
        lines.append(
            f"{row['client']:>6} {row['group']:>5} {row['train']:>6} {row['val']:>4} "
            f"{row['test']:>5}  {row['label_histogram']}"
        )
    if len(summary) > limit:
        lines.append(f"... {len(summary) - limit} more clients")
    return "\n".join(lines)
