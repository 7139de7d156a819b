"""A user's own data (dataset ``file``): generative columns (prompt/response, chat messages),
task metrics, the user's split, true groups of natural clients, and the per-task scores the
causal-LM trainer and the metrics rows report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedbip_ray.config import config_from_dict
from fedbip_ray.data.datasets import load_dataset
from fedbip_ray.data.shards import build_shards, read_shard
from fedbip_ray.models.lm import char_tokenizer
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.runtime.rows import round_row
from fedbip_ray.training import causal_lm as LT


def _data(path, **data) -> dict:
    return {"dataset": "file", "path": str(path), "num_clients": 4, **data}


def _cfg(path, **data):
    return config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm"},
                             "data": _data(path, **data)})


def _chat_frame(n: int = 24) -> pd.DataFrame:
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"add {i} and 1"},
                 {"role": "assistant", "content": str(i + 1)}]
        if i % 2:
            turns = [{"role": "system", "content": "Answer briefly."}, *turns]
        rows.append({"messages": turns, "kind": ["arithmetic", "chat"][i % 2], "user": f"u{i % 4}"})
    return pd.DataFrame(rows)


def test_prompt_response_columns_with_tasks_and_metrics(tmp_path):
    path = tmp_path / "qa.csv"
    pd.DataFrame({"question": [f"q{i}" for i in range(30)], "answer": [f"a{i}" for i in range(30)],
                  "kind": ["arithmetic", "story", "poem"] * 10}).to_csv(path, index=False)
    cfg = _cfg(path, prompt_column="question", response_column="answer", task_column="kind",
               task_metrics={"poem": "exact"})
    ds = load_dataset(cfg.data, 0)
    assert ds.label_names == ("arithmetic", "poem", "story")
    f = ds.frame
    assert f["prompt"].tolist()[:2] == ["q0", "q1"] and f["response"].tolist()[:2] == ["a0", "a1"]
    assert (f["text"] == f["prompt"]).all() and (f["turns"] == "").all()
    metric = dict(zip(f["task"], f["metric"], strict=False))
    # arithmetic: the instruct-tasks rule (exact); poem: the config; story: ROUGE-L by default
    assert metric == {"arithmetic": "exact_match", "poem": "exact_match", "story": "rouge_l"}
    assert f["label"].tolist()[:3] == [0, 2, 1]
    every = _cfg(path, prompt_column="question", response_column="answer", task_column="kind",
                 default_metric="exact")
    assert set(load_dataset(every.data, 0).frame["metric"]) == {"exact_match"}
    untasked = load_dataset(_cfg(path, prompt_column="question", response_column="answer").data, 0)
    assert set(untasked.frame["task"]) == {""} and set(untasked.frame["metric"]) == {"rouge_l"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_chat_messages_column_in_every_format(tmp_path, fmt):
    frame = _chat_frame()
    path = tmp_path / f"chat.{fmt}"
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(path)  # list<struct<role, content>>
    else:
        frame.assign(messages=frame["messages"].map(json.dumps)).to_csv(path, index=False)
    ds = load_dataset(_cfg(path, messages_column="messages", task_column="kind").data, 0)
    f = ds.frame
    assert f["prompt"].tolist()[:2] == ["add 0 and 1", "add 1 and 1"]
    assert f["response"].tolist()[:2] == ["1", "2"]
    assert json.loads(f["turns"].iat[0]) == [{"role": "user", "content": "add 0 and 1"}]
    assert [t["role"] for t in json.loads(f["turns"].iat[1])] == ["system", "user"]
    assert ds.label_names == ("arithmetic", "chat")
    assert dict(zip(f["task"], f["metric"], strict=False)) == {"arithmetic": "exact_match",
                                                                "chat": "rouge_l"}


def test_user_split_is_honoured_not_random(tmp_path):
    path = tmp_path / "reviews.csv"
    n = 48
    fold = [["training", "dev", "holdout", "training"][(i // 4) % 4] for i in range(n)]
    pd.DataFrame({"review": [f"r{i}" for i in range(n)], "stars": [i % 2 for i in range(n)],
                  "user": [f"u{i % 4}" for i in range(n)], "fold": fold}).to_csv(path, index=False)
    cfg = config_from_dict({"data": _data(
        path, text_column="review", label_column="stars", client_column="user",
        partition={"kind": "column"}, split_column="fold",
        split_values={"train": "training", "val": "dev", "test": "holdout"})})
    shards = build_shards(cfg.data, 0, tmp_path / "s")
    want = {"train": "training", "val": "dev", "test": "holdout"}
    for cid in range(4):
        split = read_shard(shards.paths[cid])
        for ours, theirs in want.items():
            rows = [int(t[1:]) for t in split[ours]["text"]]
            assert rows and all(fold[i] == theirs and i % 4 == cid for i in rows)
        assert sum(len(v) for v in split.values()) == n // 4
    again = build_shards(cfg.data, 1, tmp_path / "s1")  # another seed: the same split
    assert [s["test"] for s in again.summary] == [s["test"] for s in shards.summary]


def test_group_column_gives_natural_clients_their_true_groups(tmp_path):
    path = tmp_path / "d.jsonl"
    _chat_frame(40).assign(team=lambda f: ["red", "blue"] * 20).to_json(path, orient="records",
                                                                          lines=True)
    natural = {"messages_column": "messages", "client_column": "user",
               "partition": {"kind": "column"}}
    grouped = build_shards(_cfg(path, group_column="team", **natural).data, 0, tmp_path / "g")
    # clients u0..u3 (equal sizes, key order); u0, u2 are red, u1, u3 blue; groups sorted by name
    assert grouped.groups == (1, 0, 1, 0)
    assert [s["group"] for s in grouped.summary] == [1, 0, 1, 0]
    plain = build_shards(_cfg(path, **natural).data, 0, tmp_path / "p")
    assert plain.groups == (0, 1, 2, 3)  # without the column every key is its own group


def test_plain_template_renders_chat_turns_and_masks_them():
    tok = char_tokenizer()
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = LT.render_prompt(tok, "2+2?", turns)
    assert text == "### System:\nBe brief.\n\n### Instruction:\n2+2?\n\n### Response:\n"
    assert LT.render_prompt(tok, "2+2?") == LT.PLAIN_TEMPLATE.format(prompt="2+2?")
    ids, labels = LT.encode_example(tok, "2+2?", "4", 200, turns)
    answer = [t for t in labels if t != LT.IGNORE_INDEX]
    assert tok.decode(answer, skip_special_tokens=True) == "4"
    assert len(ids) - len(answer) == len(tok(text, add_special_tokens=False)["input_ids"])
    frame = pd.DataFrame({"text": ["2+2?"], "label": [0], "prompt": ["2+2?"], "response": ["4"],
                          "turns": [json.dumps(turns)], "task": ["math"],
                          "metric": ["exact_match"]})
    enc = LT.encode_frame(tok, frame, 200)
    assert enc.ids[0] == tuple(ids) and enc.tasks == ("math",)


def test_task_scores_use_each_examples_metric():
    scores = LT.task_scores(["4", "b", "Ana is from Oslo"], ["4", "c", "Ana is from Oslo."],
                            ["exact_match", "exact_match", "rouge_l"], ["math", "math", "text"])
    assert scores == {"math": 0.5, "text": pytest.approx(1.0)}
    assert LT.task_scores(["a"], ["a"], ["exact_match"], [""]) == {}


def _eval(acc: float, per_task: dict[str, float] | None = None) -> dict:
    split = {"accuracy": acc, "loss": 1.0, "n": 4}
    return split if per_task is None else {**split, "per_task": per_task}


def test_round_row_reports_per_task_means_over_clients():
    evals = {0: {"val": _eval(0.5, {"a": 0.5}), "test": _eval(0.25, {"a": 0.25})},
             1: {"val": _eval(1.0, {"a": 1.0}), "test": _eval(0.75, {"a": 0.75})},
             2: {"val": _eval(0.2, {"b": 0.2, "a": float("nan")}), "test": _eval(0.4, {"b": 0.4})}}
    row = round_row(1, evals, AggregationReport(round=1), [0, 1, 2], [], 1.0)
    assert row["per_task_val_score"] == {"a": 0.75, "b": 0.2}
    assert row["per_task_score"] == {"a": 0.5, "b": 0.4}
    assert row["per_client_val_accuracy"] == {"0": 0.5, "1": 1.0, "2": 0.2}
    plain = {0: {"val": _eval(0.5), "test": _eval(0.5)}}
    row = round_row(1, plain, AggregationReport(round=1), [0], [], 1.0)
    assert "per_task_score" not in row and "per_task_val_score" not in row
    assert np.isclose(row["mean_accuracy"], 0.5)
