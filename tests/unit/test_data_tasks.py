"""The task-shift classification dataset (``rotten-tomatoes-tasks``)."""

from __future__ import annotations

import pandas as pd
import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.data import tasks as T
from fedbip_ray.data.instruct import read_rotten_tomatoes_corpus
from fedbip_ray.data.shards import build_shards, read_shard


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return read_rotten_tomatoes_corpus()


def test_tasks_share_the_binary_labels_and_disagree_on_positive_reviews(corpus):
    frame = T.task_frame(corpus, per_task=300, seed=1)
    assert set(frame["client"]) == set(T.TASKS)
    counts = frame.groupby("client")["label"].agg(["size", "mean"])
    assert counts.loc["sentiment", "size"] == 300 and counts.loc["review-or-plot", "size"] == 300
    assert counts.loc["review-or-plot", "mean"] == 0.5  # balanced reviews and plots
    assert 0.3 < counts.loc["sentiment", "mean"] < 0.8
    fresh = set(corpus.loc[corpus["category"] == "fresh", "text"].map(
        lambda t: " ".join(t.split()[:30])))
    rp = frame[frame["client"] == "review-or-plot"]
    positive_reviews = rp[(rp["label"] == 0) & rp["text"].isin(fresh)]
    assert len(positive_reviews) > 50  # sentiment would call these 1: the tasks conflict
    assert not set(frame.loc[frame["client"] == "sentiment", "text"]) & set(rp["text"])


def test_deterministic_by_seed(corpus):
    a, b = T.task_frame(corpus, 200, seed=4), T.task_frame(corpus, 200, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["text"].equals(T.task_frame(corpus, 200, seed=5)["text"])


def test_column_partition_gives_one_task_per_group(tmp_path):
    cfg = config_from_dict({"data": {"dataset": "rotten-tomatoes-tasks", "num_clients": 6,
                                     "examples_per_client": 40, "partition": {"kind": "column"}}})
    shards = build_shards(cfg.data, 0, tmp_path)
    assert sorted(shards.groups) == [0, 0, 0, 1, 1, 1]
    assert shards.label_names == T.LABEL_NAMES
    by_group: dict[int, set[str]] = {}
    for cid, group in enumerate(shards.groups):
        split = read_shard(shards.paths[cid])
        texts = pd.concat(split.values())
        assert len(texts) == 40
        by_group.setdefault(group, set()).update(texts["text"])
    assert not by_group[0] & by_group[1]
