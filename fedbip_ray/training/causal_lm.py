"""Local instruction tuning of a causal LM adapter (``model.task: causal-lm``).

Each example is a (prompt, response) pair, or chat turns (a JSON list of {role, content}
in the shard's ``turns`` column) and the assistant's answer. The prompt is rendered with the
tokenizer's chat template (the turns, or one user turn, plus the assistant header), or with
:data:`PLAIN_TEMPLATE` (:data:`PLAIN_HEADERS` per turn) when the tokenizer has none; the loss
is the next-token cross entropy on the response tokens only (end-of-turn token included).
Evaluation generates greedily, at most
``min(MAX_NEW_TOKENS, reference length + EVAL_MARGIN)`` new tokens per example, and scores
the output against the reference by exact match and ROUGE-L (``rouge-score``); ``accuracy`` is
each example's primary score (column ``metric`` of the shard, else exact match) averaged,
and ``per_task`` the same average per task (column ``task``) when the split has tasks.

Batches are left-padded, with explicit position ids, so training, scoring and generation share
one layout and only the last ``longest response + 1`` positions go through the LM head.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedbip_ray.config import Config
from fedbip_ray.models.lm import build_causal_lm
from fedbip_ray.models.shared_base import FrozenBase
from fedbip_ray.training.base import AdapterTrainer, setup_torch
from fedbip_ray.training.loops import empty_metrics, evaluation_loop
from fedbip_ray.training.protocol import EvalMetrics, FitMetrics

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n",
                 "assistant": "### Response:\n"}
MAX_NEW_TOKENS = 32  # hard bound on generated tokens per example
EVAL_MARGIN = 4  # generated tokens allowed beyond the reference's length (end-of-turn included)
IGNORE_INDEX = -100
METRICS = ("exact_match", "rouge_l")
# train.precision auto on CPU: bf16 autocast (the base weights stay fp32, the adapter's too)
CPU_AUTOCAST_BF16 = True


# ------------------------------------------------------------------------------ formatting
Turns = Sequence[dict[str, str]]  # chat turns {"role": system|user|assistant, "content": str}


def chat_of(prompt: str, turns: Turns | None = None) -> list[dict[str, str]]:
    """The turns before the answer: ``turns`` when given, else one user turn ``prompt``."""
    return [dict(t) for t in turns] if turns else [{"role": "user", "content": prompt}]


def render_prompt(tok: Any, prompt: str, turns: Turns | None = None) -> str:
    """The text the model sees before its answer (chat template with generation prompt)."""
    chat = chat_of(prompt, turns)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    turns_text = "".join(f"{PLAIN_HEADERS[t['role']]}{t['content']}\n\n" for t in chat)
    return turns_text + PLAIN_HEADERS["assistant"]


def render_response(tok: Any, prompt: str, response: str, turns: Turns | None = None) -> str:
    """The text the model should produce after :func:`render_prompt` (ends with end-of-turn)."""
    eos = tok.eos_token or ""
    if getattr(tok, "chat_template", None):
        head = render_prompt(tok, prompt, turns)
        chat = chat_of(prompt, turns) + [{"role": "assistant", "content": response}]
        full = tok.apply_chat_template(chat, tokenize=False)
        if full.startswith(head):
            text = full[len(head):].rstrip()
            return text if text.endswith(eos) else text + eos
    return response + eos


def encode_example(tok: Any, prompt: str, response: str, max_length: int,
                   turns: Turns | None = None) -> tuple[list[int], list[int]]:
    """Token ids (L,) of prompt (or ``turns``) + response and labels (L,): IGNORE_INDEX on the
    prompt, the token id on the response. L <= max_length: the response keeps at most
    max_length // 2 tokens, the prompt is cut from the left (its end, the question and
    assistant header, stays).
    """
    p = tok(render_prompt(tok, prompt, turns), add_special_tokens=False)["input_ids"]
    r = tok(render_response(tok, prompt, response, turns), add_special_tokens=False)["input_ids"]
    if len(p) + len(r) > max_length:
        r = r[: max(1, max_length // 2)] if len(r) > max_length // 2 else r
        p = p[len(p) - (max_length - len(r)):]
    return list(p) + list(r), [IGNORE_INDEX] * len(p) + list(r)


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (b, L) int64, mask (b, L) int64) with every sequence right-aligned."""
    width = max((len(s) for s in seqs), default=1) or 1
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions (b, L) counting from 0 at each row's first real token (0 on padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------ scoring
_PUNCT = re.compile(r"^[\s\"'`]+|[\s\"'`.!?,;:]+$")


def normalize_answer(text: str) -> str:
    """Lower case, collapse whitespace, strip quotes and trailing punctuation."""
    return _PUNCT.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


@functools.lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge-score``; lower-cased alphanumeric tokens)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def score_predictions(predictions: Sequence[str], references: Sequence[str],
                      primary: Sequence[str]) -> dict[str, float]:
    """Mean exact match, mean ROUGE-L, and ``accuracy`` = mean of each example's primary score."""
    if not references:
        return {"accuracy": math.nan, "exact_match": math.nan, "rouge_l": math.nan}
    em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    rl = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    per = [rl[i] if primary[i] == "rouge_l" else em[i] for i in range(len(em))]
    return {"accuracy": float(np.mean(per)), "exact_match": float(np.mean(em)),
            "rouge_l": float(np.mean(rl))}


def task_scores(predictions: Sequence[str], references: Sequence[str], primary: Sequence[str],
                tasks: Sequence[str]) -> dict[str, float]:
    """{task: mean primary score of its examples} over the named tasks ("" is no task)."""
    out = {}
    for task in sorted({t for t in tasks if t}):
        rows = [i for i, t in enumerate(tasks) if t == task]
        out[task] = score_predictions([predictions[i] for i in rows], [references[i] for i in rows],
                                      [primary[i] for i in rows])["accuracy"]
    return out


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class LMColumns:
    """The text of a shard split, one entry per example; ``turns`` None where the example is
    a plain prompt."""

    prompts: list[str]
    responses: list[str]
    metrics: list[str]
    tasks: list[str]
    turns: list[list[dict[str, str]] | None]


@dataclass(frozen=True)
class LMExamples:
    """A tokenized split: per example prompt+response ids, labels (IGNORE_INDEX on the
    prompt), prompt length, reference text, primary metric and task name."""

    ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    prompt_lengths: tuple[int, ...]
    references: tuple[str, ...]
    metrics: tuple[str, ...]
    tasks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def response_length(self, i: int) -> int:
        return len(self.ids[i]) - self.prompt_lengths[i]


def frame_columns(frame: pd.DataFrame) -> LMColumns:
    """The text of a shard split: ``prompt``/``response`` columns, else ``text`` and the label
    as a string; ``turns`` (JSON chat turns, "" for none), ``metric`` (default exact match)
    and ``task`` (default "") when present."""
    def column(name: str, fallback: Any) -> list[str]:
        values = frame[name] if name in frame.columns else fallback
        return [str(x) for x in values]

    blank = [""] * len(frame)
    turns = [json.loads(t) if t else None for t in column("turns", blank)]
    return LMColumns(column("prompt", frame["text"]), column("response", frame["label"]),
                     column("metric", ["exact_match"] * len(frame)), column("task", blank), turns)


def encode_frame(tok: Any, frame: pd.DataFrame, max_length: int) -> LMExamples:
    """Tokenize every row of ``frame`` with :func:`encode_example`."""
    cols = frame_columns(frame)
    ids, labels, plen = [], [], []
    for p, r, t in zip(cols.prompts, cols.responses, cols.turns, strict=True):
        x, y = encode_example(tok, p, r, max_length, t)
        ids.append(tuple(x))
        labels.append(tuple(y))
        plen.append(sum(1 for v in y if v == IGNORE_INDEX))
    return LMExamples(tuple(ids), tuple(labels), tuple(plen), tuple(cols.responses),
                      tuple(cols.metrics), tuple(cols.tasks))


# ------------------------------------------------------------------------------ trainer
class CausalLMTrainer(AdapterTrainer):
    """A causal LM + adapter (``layout`` over the trainable adapter parameters in sorted-name
    order, flat (D,) float32 states); response-only loss, generative evaluation."""

    def __init__(self, cfg: Config, num_labels: int, device: torch.device | None = None,
                 base: FrozenBase | None = None) -> None:
        self.cfg, self.seed = cfg, cfg.seed
        self.cpu_precision = "bf16" if CPU_AUTOCAST_BF16 else "fp32"
        self.device = setup_torch(cfg, device)
        self.precision = self._resolve_precision()
        cuda_bf16 = self.device.type == "cuda" and self.precision == "bf16"
        dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        model, self.tokenizer = build_causal_lm(cfg.model, cfg.seed, self.device, dtype,
                                                self._shared_model(base, dtype))
        if cfg.train.gradient_checkpointing:
            model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        self._adopt(model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> list[int]:
        ids = ({int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None
               else set())
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos or []))
        return sorted(ids)

    # -- data -------------------------------------------------------------------------------
    def encode(self, frame: pd.DataFrame) -> LMExamples:
        """Tokenize a split once (prompt via chat template; labels on the response only)."""
        return encode_frame(self.tokenizer, frame, self.cfg.model.max_length)

    def _batch(self, data: LMExamples, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad([data.ids[i] for i in rows], self.pad_id)
        labels, _ = left_pad([data.labels[i] for i in rows], IGNORE_INDEX)
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                "position_ids": position_ids(mask).to(dev), "labels": labels.to(dev)}

    def _response_loss(self, batch: dict[str, torch.Tensor], keep: int) -> tuple[torch.Tensor, int]:
        """(sum of response-token cross entropies, number of response tokens); only the last
        ``keep`` positions (>= longest response + 1) are projected to the vocabulary."""
        with self.autocast():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], logits_to_keep=keep)
        # (b, keep-1, V): predictions for the last keep-1 tokens
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, -(keep - 1):]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="sum")
        return loss, int((target != IGNORE_INDEX).sum())

    def _keep(self, data: LMExamples, rows: Sequence[int]) -> int:
        return max(data.response_length(i) for i in rows) + 1

    # -- training ---------------------------------------------------------------------------
    def _order(self, n: int, batch_size: int, gen: torch.Generator | None) -> Iterator[list[int]]:
        order = torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]

    def train(self, data: LMExamples, epochs: int, seed: int, prox_mu: float = 0.0) -> FitMetrics:
        """Train the loaded adapter in place (mean response-token loss per batch)."""
        self.model.train()

        def loss_of(rows: list[int]) -> torch.Tensor:
            loss_sum, count = self._response_loss(self._batch(data, rows), self._keep(data, rows))
            return loss_sum / max(count, 1)

        bs = self.cfg.train.batch_size
        return self._run_epochs(epochs, seed, prox_mu, lambda gen: self._order(len(data), bs, gen),
                                loss_of)

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, data: LMExamples, rows: Sequence[int]) -> list[str]:
        """Greedy answers for ``rows``, decoded and stripped. Example i gets at most
        ``min(MAX_NEW_TOKENS, its reference length + EVAL_MARGIN)`` new tokens, independent of
        the other examples in its batch."""
        from transformers import GenerationConfig

        prompts = [data.ids[i][: data.prompt_lengths[i]] for i in rows]
        ids, mask = left_pad(prompts, self.pad_id)
        limits = [min(MAX_NEW_TOKENS, data.response_length(i) + EVAL_MARGIN) for i in rows]
        gcfg = GenerationConfig(max_new_tokens=max(limits), do_sample=False,
                                pad_token_id=self.pad_id, eos_token_id=self.stop_ids)
        with self.autocast():
            out = self.model.generate(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=gcfg)
        new = out[:, ids.shape[1]:].cpu()
        return [self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                for row, n in zip(new, limits, strict=True)]

    def predict(self, data: LMExamples) -> tuple[list[str], float]:
        """(greedy answers in data order, mean response-token loss)."""
        self.model.eval()
        bs = self.cfg.train.eval_batch_size
        order = sorted(range(len(data)), key=lambda i: (data.prompt_lengths[i], i))  # less padding
        preds: dict[int, str] = {}

        def step(rows: list[int]) -> dict[str, float]:
            s, c = self._response_loss(self._batch(data, rows), self._keep(data, rows))
            loss = float(s)
            preds.update(zip(rows, self.generate(data, rows), strict=True))
            return {"loss": loss, "tokens": c}

        batches = (order[start:start + bs] for start in range(0, len(order), bs))
        totals = evaluation_loop(batches, step)
        return ([preds[i] for i in range(len(data))],
                totals.get("loss", 0.0) / max(totals.get("tokens", 0), 1))

    def evaluate(self, data: LMExamples) -> EvalMetrics:
        """accuracy (mean primary score), exact_match, rouge_l, loss (per response token), n,
        and ``per_task`` {task: mean primary score} when the examples name tasks."""
        if len(data) == 0:
            return {**empty_metrics(), "exact_match": math.nan, "rouge_l": math.nan}
        preds, loss = self.predict(data)
        scores: dict[str, Any] = score_predictions(preds, data.references, data.metrics)
        per_task = task_scores(preds, data.references, data.metrics, data.tasks)
        if per_task:
            scores["per_task"] = per_task
        return {**scores, "loss": loss, "n": len(data)}  # type: ignore[typeddict-item]
