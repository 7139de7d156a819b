"""Newcomers' data for ``fedbip join`` of a generative run (file dataset with prompt, response
and task columns): read with the run's columns, written as shards like the run's own."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedbip_ray.config import ConfigError, config_from_dict
from fedbip_ray.data.shards import build_shards
from fedbip_ray.runtime.join_data import read_newcomers, write_newcomer_shard

from ..conftest import tiny_config


def _rows(tasks: list[str], n: int, key: str) -> pd.DataFrame:
    return pd.DataFrame({"q": [f"{t} question {i}" for t in tasks for i in range(n)],
                         "a": [f"answer {i}" for _ in tasks for i in range(n)],
                         "kind": [t for t in tasks for _ in range(n)],
                         key: [f"{key}-{t}" for t in tasks for _ in range(n)]})


def _run(tmp: Path):
    path = tmp / "fed.parquet"
    _rows(["echo", "count", "sum"], 12, "user").to_parquet(path)
    cfg = config_from_dict(tiny_config(
        model={"name": "tiny-llama", "task": "causal-lm"},
        data={"dataset": "file", "path": str(path), "prompt_column": "q", "response_column": "a",
              "task_column": "kind", "client_column": "user", "num_clients": 3,
              "examples_per_client": 12, "task_metrics": {"count": "exact", "sum": "rougeL"},
              "partition": {"kind": "column"}}))
    return cfg, build_shards(cfg.data, cfg.seed, tmp / "shards")


def test_generative_newcomers_read_with_the_runs_columns(tmp_path):
    cfg, shards = _run(tmp_path)
    new = _rows(["count", "riddle"], 10, "user")  # a known task and one the run never saw
    new.to_csv(tmp_path / "new.csv", index=False)
    got = read_newcomers(tmp_path / "new.csv", cfg, shards, "user")
    assert [n.name for n in got] == ["user-count", "user-riddle"]
    assert [n.client_id for n in got] == [3, 4]
    count, riddle = got
    assert set(count.frame["label"]) == {shards.label_names.index("count")}
    assert set(riddle.frame["label"]) == {-1}
    assert count.frame["prompt"].iloc[0] == "count question 0"
    assert count.frame["response"].iloc[0] == "answer 0"
    # the run's data.task_metrics, though "sum" is none of the newcomers' tasks
    assert set(count.frame["metric"]) == {"exact_match"}
    assert set(riddle.frame["metric"]) == {"rouge_l"}
    shard = write_newcomer_shard(count, cfg, tmp_path / "joined")
    stored = pq.read_schema(shards.paths[0]).names
    assert pq.read_schema(shard.path).names == stored
    assert shard.train + shard.val + shard.test == 10


def test_generative_newcomers_without_the_prompt_column_are_one_line(tmp_path):
    cfg, shards = _run(tmp_path)
    pd.DataFrame({"text": ["hi"], "a": ["x"], "kind": ["echo"]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="column 'q' not in") as err:
        read_newcomers(tmp_path / "bad.csv", cfg, shards)
    assert "\n" not in str(err.value) and "bad.csv" in str(err.value)
