"""Task shift for classification (dataset ``rotten-tomatoes-tasks``): text classification
tasks that share one binary label space, one task per group of clients.

=================  =====================================================  ===============
task (client key)  input                                                  label 1 means
=================  =====================================================  ===============
``sentiment``      a critic snippet                                       fresh (positive)
``review-or-plot`` a critic snippet or a plot-summary opening, balanced   plot summary
=================  =====================================================  ===============

Both tasks read critic snippets, and on a positive snippet they disagree (sentiment says 1,
review-or-plot says 0): training one model on both hurts, as joint instruction tuning hurts
some tasks. Use ``partition: {kind: column}``; clients are dealt round-robin to the tasks and
the task index is each client's group. The two tasks' snippets are disjoint; everything is
deterministic given ``seed``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedbip_ray.config import DataConfig
from fedbip_ray.data.base import LoadedDataset
from fedbip_ray.data.instruct import read_rotten_tomatoes_corpus, shuffled_snippets

TASKS: tuple[str, ...] = ("sentiment", "review-or-plot")
LABEL_NAMES: tuple[str, ...] = ("no", "yes")  # rotten / review vs fresh / plot
MIN_PER_TASK = 1000


def task_frame(corpus: pd.DataFrame, per_task: int, seed: int) -> pd.DataFrame:
    """Rows (text, label, client = task) of both tasks, ``per_task`` each at most.

    Args:
        corpus: category ("fresh"/"rotten"/"plot") and text rows.
        per_task: rows wanted per task; review-or-plot is half plots, capped by their number.
        seed: shuffles the pools.
    """
    rng = np.random.default_rng([seed, 7])
    rated, plots = shuffled_snippets(corpus, rng)
    half = min(per_task // 2, len(plots))
    sentiment = rated.iloc[:per_task]
    reviews = rated.iloc[per_task: per_task + half]
    parts = [
        pd.DataFrame({"text": sentiment["text"].to_numpy(),
                      "label": (sentiment["category"] == "fresh").to_numpy(np.int64),
                      "client": "sentiment"}),
        pd.DataFrame({"text": reviews["text"].to_numpy(), "label": 0, "client": "review-or-plot"}),
        pd.DataFrame({"text": plots.iloc[:half].to_numpy(), "label": 1,
                      "client": "review-or-plot"}),
    ]
    frame = pd.concat(parts, ignore_index=True)
    frame["label"] = frame["label"].astype("int64")
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


def load_rotten_tomatoes_tasks(cfg: DataConfig, seed: int) -> LoadedDataset:
    """Registry loader for ``rotten-tomatoes-tasks``: enough rows per task for every client."""
    per_client = cfg.examples_per_client or 0
    per_task = max(MIN_PER_TASK, per_client * math.ceil(cfg.num_clients / len(TASKS)))
    return LoadedDataset(task_frame(read_rotten_tomatoes_corpus(), per_task, seed), LABEL_NAMES)
