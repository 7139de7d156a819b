"""Datasets, partitioners and per-client Parquet shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.data import partition as P
from fedbip_ray.data.datasets import load_dataset
from fedbip_ray.data.shards import build_shards, read_shard


def test_iid_is_deterministic_and_disjoint():
    a = P.iid(100, 4, 20, seed=3)
    b = P.iid(100, 4, 20, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    allidx = np.concatenate(a)
    assert len(allidx) == 80 and len(np.unique(allidx)) == 80


def test_dirichlet_small_alpha_skews_labels():
    labels = np.repeat(np.arange(4), 250)
    parts = P.dirichlet(labels, 8, alpha=0.1, per_client=100, seed=0)
    assert [len(p) for p in parts] == [100] * 8
    assert len(np.unique(np.concatenate(parts))) == 800  # without replacement
    dominant = [np.bincount(labels[p], minlength=4).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.6


def test_pathological_gives_each_client_k_classes():
    labels = np.repeat(np.arange(10), 100)
    parts, groups = P.pathological(labels, 8, classes_per_client=2, per_client=60, seed=0)
    again, _ = P.pathological(labels, 8, classes_per_client=2, per_client=60, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    assert [len(p) for p in parts] == [60] * 8
    for p, g in zip(parts, groups, strict=True):
        counts = np.bincount(labels[p], minlength=10)
        assert (counts > 0).sum() == 2 and sorted(counts[counts > 0]) == [30, 30]
        assert counts[g] == 30  # group = the client's first class
    # 8 clients x 2 classes over 10 classes: every class is used at least once
    assert len(np.unique(labels[np.concatenate(parts)])) == 10
    # more examples than a class holds: refilled, still k classes, no duplicate rows
    big, _ = P.pathological(labels, 2, classes_per_client=1, per_client=150, seed=1)
    assert all(len(np.unique(labels[p])) == 1 and len(p) == 100 for p in big)


def test_label_shift_flips_binary_and_rolls_multiclass():
    y = np.array([0, 1, 1, 0])
    assert P.shift_labels(y, 1, 2).tolist() == [1, 0, 0, 1]
    assert P.shift_labels(y, 0, 2).tolist() == y.tolist()
    assert P.shift_labels(np.array([0, 1, 2]), 1, 3).tolist() == [1, 2, 0]


def test_split_client_fractions():
    tr, va, te = P.split_client(np.arange(100), 0.1, 0.2, seed=1)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert len(np.unique(np.concatenate([tr, va, te]))) == 100


def test_shards_roundtrip_and_group_flip(tmp_path):
    cfg = config_from_dict({"data": {"dataset": "synthetic-text", "num_clients": 4,
                                     "examples_per_client": 40}})
    shards = build_shards(cfg.data, 0, tmp_path)
    assert shards.num_clients == 4 and shards.groups == (0, 1, 0, 1)
    assert (tmp_path / "clients.json").is_file()
    parts = read_shard(shards.paths[1].read_bytes())
    assert sum(len(f) for f in parts.values()) == 40
    # group 1 is label-flipped: its "positive" cue words now carry label 0
    train = parts["train"]
    pos = train["text"].str.contains(
        "great|superb|lovely|brilliant|charming|moving|delightful|witty|fresh|good")
    neg = train["text"].str.contains("bad|awful|dull|boring|clumsy|tedious|bland|weak|messy|stale")
    assert (train[pos & ~neg]["label"] == 0).all()


def test_rotten_tomatoes_loads():
    cfg = config_from_dict({})
    ds = load_dataset(cfg.data, 0)
    assert ds.label_names == ("rotten", "fresh")
    assert len(ds.frame) > 12000 and set(ds.frame["label"].unique()) == {0, 1}


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_user_file_dataset(tmp_path, fmt):
    df = pd.DataFrame({"review": [f"text {i}" for i in range(60)],
                       "stars": ["good" if i % 2 else "bad" for i in range(60)],
                       "user": [f"u{i % 3}" for i in range(60)]})
    path = tmp_path / f"d.{fmt}"
    {"parquet": df.to_parquet, "csv": lambda p: df.to_csv(p, index=False),
     "jsonl": lambda p: df.to_json(p, orient="records", lines=True)}[fmt](path)
    cfg = config_from_dict({"data": {"dataset": "file", "path": str(path), "text_column": "review",
                                     "label_column": "stars", "client_column": "user",
                                     "num_clients": 3, "partition": {"kind": "column"}}})
    shards = build_shards(cfg.data, 0, tmp_path / "shards")
    assert shards.label_names == ("bad", "good") and shards.num_clients == 3
    assert [s["train"] + s["val"] + s["test"] for s in shards.summary] == [20, 20, 20]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"dataset": "file"}, "data.path: required"),
        ({"dataset": "file", "path": "/nonexistent.parquet"}, "file not found"),
        ({"dataset": "nope"}, "unknown dataset 'nope'"),
        ({"dataset": "synthetic-text", "num_clients": 500, "examples_per_client": 100},
         "need 50000 examples"),
        ({"dataset": "file", "path": "@CSV", "label_column": "missing"}, "column 'missing' not in"),
    ],
)
def test_bad_data_input(tmp_path, data, needle):
    if data.get("path") == "@CSV":
        p = tmp_path / "x.csv"
        pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(p, index=False)
        data = {**data, "path": str(p)}
    cfg = config_from_dict({"data": data})
    with pytest.raises(ConfigError, match=needle):
        build_shards(cfg.data, 0, tmp_path / "s")


def test_column_partition_with_fewer_keys_than_clients_groups_by_key():
    keys = np.array(["a"] * 30 + ["b"] * 20)
    parts, groups = P.by_column(keys, 4, None, seed=0)
    assert groups.tolist() == [0, 1, 0, 1]
    assert set(keys[parts[0]]) == {"a"} and set(keys[parts[1]]) == {"b"}
    assert len(np.intersect1d(parts[0], parts[2])) == 0
    assert sum(len(p) for p in parts) == 50
