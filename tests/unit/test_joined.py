"""Joined clients added to a resumed run (runtime/joined.py): the checkpoint grows by their
joined states, the shard set by their shards; the list may only grow; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from fedbip_ray.config import ConfigError
from fedbip_ray.data.shards import ShardSet
from fedbip_ray.runtime.checkpoint import Checkpoint, config_difference
from fedbip_ray.runtime.joined import (
    check_growth,
    grow_checkpoint,
    read_joined,
    with_joined,
)


def _join_dir(d: Path, first: int, names: list[str], dim: int = 3) -> Path:
    entries = []
    for j, name in enumerate(names):
        directory = f"newcomer_{first + j:05d}_{name}"
        (d / directory).mkdir(parents=True)
        save_file({"state": np.full(dim, first + j, dtype=np.float32),
                   "local": np.zeros(dim, dtype=np.float32)},
                  str(d / directory / "state.safetensors"))
        (d / "shards").mkdir(exist_ok=True)
        frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 0, 1], "group": [-1] * 3,
                              "split": ["train", "val", "test"]})
        frame.to_parquet(d / "shards" / f"{directory}.parquet")
        entries.append({"name": name, "client_id": first + j, "directory": directory})
    (d / "summary.json").write_text(json.dumps({"newcomers": entries}))
    return d


def _checkpoint(n: int, dim: int = 3) -> Checkpoint:
    tensors = {"states": np.arange(n * dim, dtype=np.float32).reshape(n, dim),
               "init": np.zeros(dim, dtype=np.float32),
               "similarity": np.eye(n), "memory": np.ones((n, 2))}
    return Checkpoint(Path("ck"), 3, tensors, {}, [], {})


def _shards(d: Path, n: int) -> ShardSet:
    d.mkdir()
    summary = tuple({"client": c, "group": c % 2, "train": 1, "val": 1, "test": 1}
                    for c in range(n))
    return ShardSet(d, tuple(d / f"client_{c:05d}.parquet" for c in range(n)),
                    tuple(c % 2 for c in range(n)), ("neg", "pos"), summary)


def test_checkpoint_and_shards_grow_by_the_joined_clients(tmp_path):
    a = _join_dir(tmp_path / "a", 2, ["x", "y"])
    b = _join_dir(tmp_path / "b", 4, ["z"])  # a later join, after a and b's clients took part
    ck, shards = with_joined([str(a), str(b)], _checkpoint(2), _shards(tmp_path / "s", 2))
    assert ck is not None and ck.num_clients == 5
    assert np.array_equal(ck.tensors["states"][:2], _checkpoint(2).tensors["states"])
    assert [ck.tensors["states"][c, 0] for c in (2, 3, 4)] == [2.0, 3.0, 4.0]
    assert ck.tensors["similarity"].shape == (5, 5) and np.isnan(ck.tensors["similarity"][4]).all()
    assert ck.tensors["similarity"][1, 1] == 1.0 and np.isnan(ck.tensors["memory"][2:]).all()
    assert shards.num_clients == 5 and shards.groups == (0, 1, -1, -1, -1)
    meta = json.loads((tmp_path / "s" / "clients.json").read_text())["clients"]
    assert [m.get("joined") for m in meta] == [None, None, "x", "y", "z"]
    assert meta[2]["label_histogram"] == [1, 2] and meta[2]["train"] == 1
    # a checkpoint that already holds them (a later resume) is kept as is
    again = grow_checkpoint(ck, read_joined([str(a), str(b)], 2), 2)
    assert again is ck


def test_the_joined_list_only_grows():
    check_growth([], ["a"])
    check_growth(["a"], ["a", "b"])
    with pytest.raises(ConfigError, match="must start with"):
        check_growth(["a", "b"], ["b"])
    assert config_difference({"data": {"joined": []}}, {"data": {"joined": ["a"]}}) is None


@pytest.mark.parametrize("case", ["missing", "not-a-join", "other-run", "no-resume", "size"])
def test_bad_joined_directories_are_one_line(tmp_path, case):
    join = _join_dir(tmp_path / "j", 3 if case == "other-run" else 2, ["x"],
                     dim=4 if case == "size" else 3)
    if case == "not-a-join":
        (join / "summary.json").unlink()
    dirs = [str(tmp_path / "nope")] if case == "missing" else [str(join)]
    ck = None if case == "no-resume" else _checkpoint(2)
    with pytest.raises(ConfigError) as err:
        with_joined(dirs, ck, _shards(tmp_path / "s", 2))
    message = str(err.value)
    assert "\n" not in message
    expected = {"missing": "not found", "not-a-join": "no summary.json",
                "other-run": "joined a run of 3 clients", "no-resume": "--resume",
                "size": "state of (4,)"}[case]
    assert expected in message, message
