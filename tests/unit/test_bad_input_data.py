"""Bad data files and data fields through the real `fedbip` CLI: each case exits 2 with ONE
line on stderr naming the file, the column or the client, and no traceback. Every case fails
while the shards are built, before Ray starts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedbip_ray.cli import main

from ..conftest import tiny_config

LM = {"name": "tiny-llama", "task": "causal-lm", "max_length": 48,
      "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}}


def _chat(i: int, last: str = "assistant") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"q{i}"}, {"role": last, "content": f"a{i}"}]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _chat_rows(n: int = 40, **extra: Callable[[int], object]) -> list[dict]:
    return [{"messages": _chat(i), "user": f"u{i % 4}", "task": ["a", "b"][i % 2],
             **{k: f(i) for k, f in extra.items()}} for i in range(n)]


@dataclass(frozen=True)
class Case:
    """``file``: name and content written next to the config; ``data``: the data section
    (``{path}`` is the written file); ``model``: the model section (None: tiny BERT)."""

    id: str
    needle: str
    file: tuple[str, str]
    data: dict
    model: dict | None = None

    def config(self, tmp: Path) -> dict:
        path = tmp / self.file[0]
        path.write_text(self.file[1])
        data = {"dataset": "file", "num_clients": 4, "examples_per_client": None,
                "partition": {"kind": "iid"},
                **{k: (v.replace("{path}", str(path)) if isinstance(v, str) else v)
                   for k, v in self.data.items()}}
        model = {"model": {**LM, **self.model}} if self.model is not None else {}
        sections = {"data": data, **model}
        return tiny_config(**sections)


CHAT = {"path": "{path}", "messages_column": "messages"}
NATURAL = {"client_column": "user", "partition": {"kind": "column"}}
CASES = [
    Case("csv-header-only", "data.path '{tmp}/d.csv': no rows (columns: text, label)",
         ("d.csv", "text,label\n"), {"path": "{path}"}),
    Case("empty-file", "data.path '{tmp}/d.csv': no rows", ("d.csv", ""), {"path": "{path}"}),
    Case("empty-jsonl", "data.path '{tmp}/d.jsonl': no rows", ("d.jsonl", ""), {"path": "{path}"}),
    Case("text-column-blank", "data.text_column: column 'review' in {tmp}/d.jsonl is empty",
         ("d.jsonl", _jsonl([{"review": " ", "stars": i % 2} for i in range(20)])),
         {"path": "{path}", "text_column": "review", "label_column": "stars"}),
    Case("text-column-all-missing", "data.text_column: column 'text' in {tmp}/d.csv is empty",
         ("d.csv", "text,label\n" + ",1\n,0\n" * 10), {"path": "{path}"}),
    Case("missing-prompt-column", "data.prompt_column: column 'question' not in {tmp}/d.csv",
         ("d.csv", "instruction,response\n" + "hi,there\n" * 20),
         {"path": "{path}", "prompt_column": "question"}, model={}),
    Case("missing-response-column", "data.response_column: column 'answer' not in {tmp}/d.csv",
         ("d.csv", "question,response\n" + "hi,there\n" * 20),
         {"path": "{path}", "prompt_column": "question", "response_column": "answer"}, model={}),
    Case("missing-messages-column", "data.messages_column: column 'chat' not in",
         ("d.jsonl", _jsonl(_chat_rows())), {**CHAT, "messages_column": "chat"}, model={}),
    Case("messages-not-a-list", "column 'messages' in {tmp}/d.jsonl, row 0: a string, not a list",
         ("d.jsonl", _jsonl([{"messages": "hello"}] * 20)), CHAT, model={}),
    Case("messages-turn-without-content", "row 0: not a list of {role, content} turns",
         ("d.jsonl", _jsonl([{"messages": [{"role": "user"}]}] * 20)), CHAT, model={}),
    Case("messages-unknown-role", "row 0: role 'bot' is none of system, user, assistant",
         ("d.jsonl", _jsonl([{"messages": _chat(0, "bot")}] * 20)), CHAT, model={}),
    Case("messages-last-turn-not-assistant", "row 0: the last turn is not from the assistant",
         ("d.jsonl", _jsonl([{"messages": _chat(0, "user")}] * 20)), CHAT, model={}),
    Case("messages-without-user-turn", "row 0: no user turn before the assistant's answer",
         ("d.jsonl", _jsonl([{"messages": [{"role": "assistant", "content": "x"}]}] * 20)),
         CHAT, model={}),
    Case("chat-file-read-as-classification", "set data.messages_column: messages",
         ("d.jsonl", _jsonl(_chat_rows())), {"path": "{path}"}),
    Case("task-metric-for-unknown-task", "data.task_metrics: task 'c' not in column 'task' of",
         ("d.jsonl", _jsonl(_chat_rows())),
         {**CHAT, "task_column": "task", "task_metrics": {"a": "exact", "c": "rougeL"}}, model={}),
    Case("task-metrics-without-task-column", "data.task_metrics needs data.task_column",
         ("d.jsonl", _jsonl(_chat_rows())), {**CHAT, "task_metrics": {"a": "exact"}}, model={}),
    Case("unknown-task-metric", "config field 'data.task_metrics.a': Input should be 'exact' or",
         ("d.jsonl", _jsonl(_chat_rows())),
         {**CHAT, "task_column": "task", "task_metrics": {"a": "bleu"}}, model={}),
    Case("missing-task-column", "data.task_column: column 'kind' not in",
         ("d.jsonl", _jsonl(_chat_rows())), {**CHAT, "task_column": "kind"}, model={}),
    Case("unknown-split-value", "column 'split' in {tmp}/d.jsonl holds 'dev', none of 'train', "
         "'validation', 'test' (data.split_values)",
         ("d.jsonl", _jsonl(_chat_rows(split=lambda i: ["train", "dev", "test"][i % 3]))),
         {**CHAT, "split_column": "split", "split_values": {"val": "validation"}}, model={}),
    Case("missing-split-column", "data.split_column: column 'fold' not in",
         ("d.jsonl", _jsonl(_chat_rows())), {**CHAT, "split_column": "fold"}, model={}),
    Case("client-without-test-rows",
         "data.split_column: client 1 ('u1') has no test rows (value 'test' in column 'split')",
         ("d.jsonl", _jsonl(_chat_rows(
             split=lambda i: "test" if i % 8 >= 4 and i % 4 != 1 else "train"))),
         {**CHAT, **NATURAL, "split_column": "split"}, model={}),
    Case("client-without-train-rows", "client 0 ('u0') has no train rows",
         ("d.csv", "text,label,user,split\n" + "".join(
             f"t{i},{i % 2},u{i % 4},{'test' if i % 4 == 0 or i % 8 >= 4 else 'train'}\n"
             for i in range(40))), {"path": "{path}", **NATURAL, "split_column": "split"}),
    Case("split-values-not-distinct", "data.split_values: values must differ",
         ("d.csv", "text,label\n" + "a,0\nb,1\n" * 20),
         {"path": "{path}", "split_values": {"val": "test"}}),
    Case("group-column-without-natural-clients",
         "data.group_column needs data.partition.kind 'column'",
         ("d.csv", "text,label,g\n" + "a,0,x\nb,1,y\n" * 20),
         {"path": "{path}", "group_column": "g"}),
    Case("group-column-mixed-within-a-client", "data.group_column: client 'u1' in {tmp}/d.csv has "
         "rows in several groups (x, y)",
         ("d.csv", "text,label,user,g\n" + "".join(
             f"t{i},{i % 2},u{i % 4},{'x' if i % 4 != 1 or i < 20 else 'y'}\n" for i in range(40))),
         {"path": "{path}", **NATURAL, "group_column": "g"}),
    Case("group-column-missing-values",
         "data.group_column: column 'g' in {tmp}/d.csv has 10 missing",
         ("d.csv", "text,label,user,g\n" + "".join(
             f"t{i},{i % 2},u{i % 4},{'x' if i % 4 else ''}\n" for i in range(40))),
         {"path": "{path}", **NATURAL, "group_column": "g"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_exits_2_with_one_line(case: Case, tmp_path, capfd):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(case.config(tmp_path)))
    capfd.readouterr()
    code = main(["run", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out")])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    needle = case.needle.replace("{tmp}", str(tmp_path))
    assert lines[0].startswith("fedbip: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err and "at least 2 distinct labels" not in err


def test_cases_are_distinct():
    assert len({c.id for c in CASES}) == len(CASES) >= 20
