"""A user's own instruction data end to end: a causal-LM federation (tiny random-init Llama)
on a real local Ray from a JSONL file of chat messages with task, client, split and group
columns; per-task scores in every metrics.jsonl row, the user's split and groups honoured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedbip_ray.config import config_from_dict
from fedbip_ray.runtime.federation import run_federation

from ..conftest import tiny_config

pytestmark = pytest.mark.ray

TASKS = ("capital", "echo")


def _write_chat(path, n: int = 48) -> None:
    """4 users; u0/u2 ask capitals (team a), u1/u3 want an echo (team b); per user the rows
    cycle through train, train, validation, test."""
    with path.open("w") as fh:
        for i in range(n):
            user = i % 4
            if user % 2 == 0:
                turns = [{"role": "system", "content": "Answer with one word."},
                         {"role": "user", "content": f"Capital of land {i}?"},
                         {"role": "assistant", "content": f"City{i}"}]
            else:
                turns = [{"role": "user", "content": f"Repeat: hello {i}"},
                         {"role": "assistant", "content": f"hello {i}"}]
            split = ["train", "train", "validation", "test"][(i // 4) % 4]
            row = {"messages": turns, "task": TASKS[user % 2], "user": f"u{user}",
                   "split": split, "team": "ab"[user % 2]}
            fh.write(json.dumps(row) + "\n")


def test_chat_jsonl_federation_reports_per_task_scores(ray_local, tmp_path):
    data = tmp_path / "chat.jsonl"
    _write_chat(data)
    cfg = config_from_dict(tiny_config(
        name="own-chat",
        model={"name": "tiny-llama", "task": "causal-lm", "max_length": 64,
               "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "intermediate_size": 32},
               "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
        data={"dataset": "file", "path": str(data), "messages_column": "messages",
              "task_column": "task", "task_metrics": {"capital": "exact"},
              "client_column": "user", "group_column": "team", "split_column": "split",
              "split_values": {"val": "validation"}, "num_clients": 4,
              "examples_per_client": None, "partition": {"kind": "column"}},
        train={"local_epochs": 1, "batch_size": 8, "lr": 0.01, "eval_batch_size": 8},
        strategy={"name": "oracle"},
        federation={"rounds": 2},
    ))
    out = tmp_path / "run"
    summary = run_federation(cfg, out, echo=lambda s: None)
    assert summary["rounds_completed"] == 2

    meta = json.loads((out / "shards" / "clients.json").read_text())
    assert [c["group"] for c in meta["clients"]] == [0, 1, 0, 1]  # the team column
    assert [(c["train"], c["val"], c["test"]) for c in meta["clients"]] == [(6, 3, 3)] * 4

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r["per_task_score"]) == set(TASKS) == set(r["per_task_val_score"])
        assert all(0.0 <= v <= 1.0 for v in [*r["per_task_score"].values(),
                                            *r["per_task_val_score"].values()])
        test = r["per_client_accuracy"]  # one task per client: the task score is their mean
        assert r["per_task_score"]["capital"] == pytest.approx((test["0"] + test["2"]) / 2)
        assert r["per_task_score"]["echo"] == pytest.approx((test["1"] + test["3"]) / 2)
        val = r["per_client_val_accuracy"]
        assert r["per_task_val_score"]["echo"] == pytest.approx((val["1"] + val["3"]) / 2)

    # the oracle averaged inside the user's groups: clients of a team share one state
    states = load_file(str(out / "checkpoints" / "round_00002" / "server.safetensors"))["states"]
    assert np.array_equal(states[0], states[2]) and np.array_equal(states[1], states[3])
    assert not np.allclose(states[0], states[1])
