"""A user's own table (dataset ``file``): the checks that name the file and column, the
generative columns (prompt/response or chat turns, task, metric), the split the user made and
the true group of each natural client.

Generative rows become the columns the causal-LM trainer reads: ``prompt`` (the last user
turn for chat rows), ``response``, ``turns`` (JSON list of the {role, content} turns before
the response; "" for prompt/response rows), ``task`` ("" without a task column) and
``metric`` (``exact_match`` or ``rouge_l``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fedbip_ray.config import ConfigError, DataConfig

CHAT_ROLES = ("system", "user", "assistant")
METRIC_NAMES = {"exact": "exact_match", "rougeL": "rouge_l"}
SPLITS = ("train", "val", "test")
Turn = dict[str, str]


def columns_text(raw: pd.DataFrame) -> str:
    return ", ".join(map(str, raw.columns))


def require_rows(raw: pd.DataFrame, path: str) -> None:
    """ConfigError when the file holds no rows."""
    if len(raw) == 0:
        raise ConfigError(f"data.path '{path}': no rows (columns: {columns_text(raw) or 'none'})")


def require_columns(raw: pd.DataFrame, path: str, fields: Iterable[tuple[str, str | None]]) -> None:
    """ConfigError naming the first ``(field, column)`` whose column the file lacks."""
    for field, column in fields:
        if column and column not in raw.columns:
            raise ConfigError(f"data.{field}: column '{column}' not in {path} "
                              f"(columns: {columns_text(raw)})")


def nonblank(values: pd.Series) -> np.ndarray:
    """(n,) bool: the value is present and, if a string, not only whitespace."""
    return np.array([not (v is None or (isinstance(v, float) and v != v)
                          or (isinstance(v, str) and not v.strip())) for v in values], dtype=bool)


def drop_blank(raw: pd.DataFrame, field: str, column: str, path: str) -> pd.DataFrame:
    """Rows whose ``column`` holds a value; ConfigError when none does."""
    keep = nonblank(raw[column])
    if not keep.any():
        raise ConfigError(f"data.{field}: column '{column}' in {path} is empty "
                          f"(no non-blank values in {len(raw)} rows)")
    return raw[keep]


def strings(raw: pd.DataFrame, field: str, column: str, path: str) -> np.ndarray:
    """(n,) str values of ``column``; ConfigError when some are missing."""
    missing = int((~nonblank(raw[column])).sum())
    if missing:
        raise ConfigError(f"data.{field}: column '{column}' in {path} has {missing} missing values")
    return raw[column].astype(str).to_numpy()


# ------------------------------------------------------------------------------ chat turns
def parse_turns(value: Any) -> list[Turn] | str:
    """A cell of the messages column as a list of {role, content} turns, or why it is not
    one. Accepts a list (JSONL), an array of structs (Parquet) or a JSON string (CSV)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return "a string, not a list of {role, content} turns"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not value:
        return "not a non-empty list of {role, content} turns"
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return "not a list of {role, content} turns"
        if turn.get("role") not in CHAT_ROLES:
            return f"role {turn.get('role')!r} is none of {', '.join(CHAT_ROLES)}"
        turns.append({"role": str(turn["role"]), "content": turn["content"]})
    return turns


def split_chat(turns: Sequence[Turn]) -> tuple[list[Turn], str] | str:
    """(turns before the response, the response = the last assistant turn), or why not."""
    if turns[-1]["role"] != "assistant":
        return "the last turn is not from the assistant"
    context = list(turns[:-1])
    if not any(t["role"] == "user" for t in context):
        return "no user turn before the assistant's answer"
    return context, turns[-1]["content"]


def chat_columns(values: pd.Series, column: str,
                 path: str) -> tuple[list[str], list[str], list[str]]:
    """(prompts = last user turn, responses, turns JSON) of a messages column."""
    prompts, responses, contexts = [], [], []
    for row, value in enumerate(values):
        parsed = parse_turns(value)
        split = split_chat(parsed) if isinstance(parsed, list) else parsed
        if isinstance(split, str):
            raise ConfigError(f"data.messages_column: column '{column}' in {path}, "
                              f"row {row}: {split}")
        context, response = split
        prompts.append(next(t["content"] for t in reversed(context) if t["role"] == "user"))
        responses.append(response)
        contexts.append(json.dumps(context, ensure_ascii=False))
    return prompts, responses, contexts


# ------------------------------------------------------------------------------ tasks, metrics
def task_metric(task: str, cfg: DataConfig) -> str:
    """The primary score of ``task``: data.task_metrics, else data.default_metric, else the
    instruct-tasks rule for its name, else ROUGE-L."""
    from fedbip_ray.data.instruct import TASK_METRIC

    if task in cfg.task_metrics:
        return METRIC_NAMES[cfg.task_metrics[task]]
    if cfg.default_metric:
        return METRIC_NAMES[cfg.default_metric]
    return TASK_METRIC.get(task, "rouge_l")


def check_task_metrics(tasks: Sequence[str], cfg: DataConfig) -> None:
    """ConfigError when data.task_metrics names a task the task column does not hold."""
    known = set(tasks)
    for task in cfg.task_metrics:
        if task not in known:
            raise ConfigError(f"data.task_metrics: task '{task}' not in column '{cfg.task_column}' "
                              f"of {cfg.path} (tasks: {', '.join(sorted(known))})")


def generative_frame(raw: pd.DataFrame, cfg: DataConfig,
                     check_metrics: bool = True) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The trainer's columns for (prompt, response) or chat rows; label = task index, label
    names = the sorted tasks (``("response",)`` without a task column). ``check_metrics``
    False: data.task_metrics may name tasks these rows lack (a subset, e.g. new clients)."""
    path = str(cfg.path)
    if cfg.messages_column:
        require_columns(raw, path, [("messages_column", cfg.messages_column)])
        column = cfg.messages_column
        prompts, responses, turns = chat_columns(raw[column], column, path)
    else:
        assert cfg.prompt_column is not None
        require_columns(raw, path, [("prompt_column", cfg.prompt_column),
                                    ("response_column", cfg.response_column)])
        prompts = list(strings(raw, "prompt_column", cfg.prompt_column, path))
        responses = list(strings(raw, "response_column", cfg.response_column, path))
        turns = [""] * len(raw)
    if cfg.task_column:
        tasks = [str(t) for t in strings(raw, "task_column", cfg.task_column, path)]
        if check_metrics:
            check_task_metrics(tasks, cfg)
    else:
        tasks = [""] * len(raw)
    names = tuple(sorted(set(tasks))) if cfg.task_column else ("response",)
    index = {t: i for i, t in enumerate(names)}
    metrics = {t: task_metric(t, cfg) for t in set(tasks)}
    frame = pd.DataFrame({"text": prompts, "label": [index.get(t, 0) for t in tasks],
                          "prompt": prompts, "response": responses, "turns": turns,
                          "task": tasks, "metric": [metrics[t] for t in tasks]})
    frame["label"] = frame["label"].astype("int64")
    return frame, names


# ------------------------------------------------------------------------------ splits, groups
def user_splits(raw: pd.DataFrame, cfg: DataConfig) -> np.ndarray | None:
    """(n,) split names ("train"/"val"/"test") from data.split_column, None without one."""
    if not cfg.split_column:
        return None
    path = str(cfg.path)
    values = strings(raw, "split_column", cfg.split_column, path)
    ours = {v: s for s, v in cfg.split_values.items()}
    unknown = sorted(set(values) - set(ours))
    if unknown:
        expected = ", ".join(f"'{cfg.split_values[s]}'" for s in SPLITS if s in cfg.split_values)
        raise ConfigError(f"data.split_column: column '{cfg.split_column}' in {path} holds "
                          f"'{unknown[0]}', none of {expected} (data.split_values)")
    return np.array([ours[v] for v in values], dtype=object)


def user_groups(raw: pd.DataFrame, cfg: DataConfig) -> np.ndarray | None:
    """(n,) true group of each row from data.group_column (one group per client key), None
    without one."""
    if not cfg.group_column:
        return None
    path = str(cfg.path)
    groups = strings(raw, "group_column", cfg.group_column, path)
    if cfg.client_column:
        keys = raw[cfg.client_column].astype(str).to_numpy()
        per_key = pd.Series(groups).groupby(keys).unique()
        mixed = per_key[per_key.map(len) > 1]
        if len(mixed):
            key, values = mixed.index[0], sorted(mixed.iloc[0])
            raise ConfigError(f"data.group_column: client '{key}' in {path} has rows in "
                              f"several groups ({', '.join(values[:3])})")
    return groups
