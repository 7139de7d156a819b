"""Generative benchmark: federated instruction tuning of a causal LM (``model.task: causal-lm``).

Twelve clients, two per task of the ``instruct-tasks`` dataset (``partition: column``: the
task is the client's group), LoRA on q_proj/v_proj; every strategy runs through
``run_federation`` on identical shards per seed. Each client is scored on its own test split
by greedy generation (exact match; ROUGE-L for ``record-to-text``). The table gives the
final-round score per task (mean over the task's clients, mean ± std over seeds) and their
average; the plot the average score per round.

    python benchmarks/instruct.py --quick          # tiny random-init Llama, 1 seed (CI, < 2 min)
    python benchmarks/instruct.py                  # SmolLM2-135M-Instruct, seeds 0,1,2
    python benchmarks/instruct.py --strategies fedbip,oracle --seeds 0 --set federation.rounds=2

Writes benchmarks/results/instruct.md and instruct.png (``--quick``: instruct_quick.*), or
``--out`` and the PNG next to it; raw results go to ``<workdir>/<name>.json``. An interrupted
run resumes from ``<out>.partial.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_run_args,
    bench_parser,
    command_line,
    load_partial,
    machine_line,
    mean_std,
    merge,
    paired,
    parse_seeds,
    plot_curves,
    preamble_lines,
    run_dirname,
    run_recorded,
    strategy_config,
)
from fedbip_ray.config import config_from_dict  # noqa: E402
from fedbip_ray.data.instruct import TASKS  # noqa: E402

STRATEGIES = ["local", "fedavg", "fedamp", "fedbip", "fedbip-layer", "oracle", "fedsa-lora",
              "fedawa"]
_DATA = {"dataset": "instruct-tasks", "num_clients": 12, "val_fraction": 0.1,
         "test_fraction": 0.25, "partition": {"kind": "column"}}
SETTINGS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "model": {"name": "smollm2", "task": "causal-lm", "max_length": 96,
                  "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
        "data": {**_DATA, "examples_per_client": 40},
        "train": {"local_epochs": 1, "batch_size": 8, "lr": 0.002, "eval_batch_size": 16},
        "federation": {"rounds": 4},
    },
    "tiny": {
        "model": {"name": "tiny-llama", "task": "causal-lm", "max_length": 80,
                  "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                           "intermediate_size": 64},
                  "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {**_DATA, "examples_per_client": 24},
        "train": {"local_epochs": 2, "batch_size": 8, "lr": 0.05, "eval_batch_size": 16},
        "federation": {"rounds": 2},
    },
}


def run_config(setting: str, strategy: str, seed: int, overrides: list[str]) -> Any:
    """The validated config of one run."""
    data = merge(SETTINGS[setting], strategy_config(f"instruct-{setting}", strategy, seed))
    return config_from_dict(data, overrides)


def client_tasks(out: Path) -> dict[str, str]:
    """Client id (str) -> its task, read from the run's Parquet shards."""
    import pandas as pd

    tasks = {}
    for path in sorted((out / "shards").glob("client_*.parquet")):
        values = pd.read_parquet(path, columns=["task"])["task"].unique()
        tasks[str(int(path.stem.split("_")[1]))] = str(values[0])
    return tasks


def task_scores(per_client: dict[str, float], tasks: dict[str, str]) -> dict[str, float]:
    """Mean score per task over its clients, plus ``average`` = mean over tasks."""
    by_task: dict[str, list[float]] = {}
    for cid, score in per_client.items():
        if score is not None and not math.isnan(score):
            by_task.setdefault(tasks[cid], []).append(float(score))
    out = {t: float(np.mean(v)) for t, v in by_task.items()}
    out["average"] = float(np.mean(list(out.values()))) if out else math.nan
    return out


def run_one(setting: str, strategy: str, seed: int, overrides: list[str],
            workdir: Path) -> dict[str, Any]:
    """One federation; per-task final scores, the average per round and timings."""
    from fedbip_ray.runtime.federation import run_federation

    cfg = run_config(setting, strategy, seed, overrides)
    out = workdir / setting / run_dirname(strategy, seed)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume
    t0 = time.perf_counter()
    summary = run_federation(cfg, out, echo=lambda s: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tasks = client_tasks(out)
    curve = [(r["round"], task_scores(r["per_client_accuracy"], tasks)["average"])
             for r in rows if r.get("per_client_accuracy")]
    return {"setting": setting, "strategy": strategy, "seed": seed,
            "scores": task_scores(summary["per_client_accuracy"], tasks), "curve": curve,
            "round_seconds": [r["seconds"] for r in rows], "wall": time.perf_counter() - t0,
            "step_seconds": [r["extra"]["train_step_seconds"] for r in rows
                             if "train_step_seconds" in r.get("extra", {})],
            "client_peak_rss_mib": max((r["extra"].get("client_peak_rss_mib", 0.0) for r in rows),
                                       default=0.0)}


def table(results: list[dict]) -> list[str]:
    """Markdown rows: strategy x (tasks, average, seconds per round and per local training
    step, the largest client actor's peak memory, wall seconds)."""
    lines = ["| strategy | " + " | ".join(TASKS) + " | **average** | s/round | s/train step "
             "| client peak RSS (MiB) | wall s |",
             "|---|" + "---|" * (len(TASKS) + 5)]
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        rs = [r for r in results if r["strategy"] == strategy]
        cells = [mean_std([r["scores"].get(t, math.nan) for r in rs]) for t in (*TASKS, "average")]
        cells[-1] = f"**{cells[-1]}**"
        per_round = np.mean([s for r in rs for s in r["round_seconds"]])
        steps = [s for r in rs for s in r.get("step_seconds", [])]
        step = f"{np.mean(steps):.3f}" if steps else "n/a"
        peak = max((r.get("client_peak_rss_mib", 0.0) for r in rs), default=0.0)
        lines.append(f"| {strategy} | " + " | ".join(cells)
                     + f" | {per_round:.0f} | {step} | {peak:.0f} "
                     f"| {np.mean([r['wall'] for r in rs]):.0f} |")
    return lines


def paired_lines(results: list[dict], reference: str = "fedbip") -> list[str]:
    """``reference`` minus every other strategy in average score, paired by seed (mean ± std over
    the seeds both ran)."""
    def scores(strategy: str) -> dict[int, float]:
        return {r["seed"]: r["scores"].get("average", math.nan) for r in results
                if r["strategy"] == strategy}

    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        d = None if strategy == reference else paired(scores(reference), scores(strategy))
        if d is not None:
            out.append(f"| {strategy} | {d[0]:+.3f} ± {d[1]:.3f} | {d[3]}/{d[2]} |")
    if not out:
        return []
    return [f"{reference} minus each strategy, average score, paired by seed:", "",
            "| strategy | difference | seeds where " + reference + " is higher |", "|---|---|---|",
            *out, ""]


def _setup_line(cfg: Any) -> str:
    """What was trained: model, adapter, clients, data split and schedule."""
    d = cfg.data
    return (f"Model `{cfg.model.name}` + LoRA r={cfg.model.peft.r} on "
            f"{', '.join(cfg.model.peft.target_modules or ('q_proj', 'v_proj'))}; "
            f"{d.num_clients} clients, one task each ({d.num_clients // len(TASKS)} per task), "
            f"{d.examples_per_client} examples per client "
            f"(test {d.test_fraction:.0%}, val {d.val_fraction:.0%}); {cfg.federation.rounds} "
            f"rounds x {cfg.train.local_epochs} local epoch(s), batch {cfg.train.batch_size}, "
            f"lr {cfg.train.lr}.")


def _tiny_note(cfg: Any) -> list[str]:
    """The caveat printed under the tables of a random-init model."""
    if not cfg.model.name.startswith("tiny"):
        return []
    return [f"`{cfg.model.name}` is a random-init model: a smoke test of the pipeline, not a "
            "result. Its adapter trains the token embeddings and output layer, so mixing clients "
            "of different tasks quickly collapses it to the shared end-of-turn token (empty "
            "answers).", ""]


def write_report(results: list[dict], setting: str, out: Path, command: str, seeds: list[int],
                 overrides: list[str], preamble: str = "") -> str:
    """Write ``out`` (markdown) and the PNG next to it (``preamble``: text after the header)."""
    cfg = run_config(setting, "local", seeds[0], overrides)
    png = out.with_suffix(".png")
    plot_curves(results, png, f"instruct-tasks, {cfg.model.name}: average test score per round",
                "average task score (test)", title_fontsize=9, integer_rounds=True)
    lines = [
        "# Generative benchmark: federated instruction tuning", "",
        f"Command: `{command}`  ",
        machine_line(seeds), "",
        *preamble_lines(preamble),
        _setup_line(cfg), "",
        "Score = each client's greedy-generation score on its own test split at the final round "
        "(exact match; ROUGE-L F1 for record-to-text), averaged over the task's clients; "
        "mean ± std over seeds. `sentiment` and `sentiment-flipped` share prompts with opposite "
        "answers.", "",
        *table(results), "",
        *paired_lines(results),
        *_tiny_note(cfg),
        f"![average score per round]({png.name})", "",
    ]
    text = "\n".join(lines)
    out.write_text(text + "\n")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = bench_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 1 seed, 2 rounds (CI)")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default=None,
                    help="default: smollm2 (--quick: tiny)")
    add_run_args(ap, STRATEGIES, "/tmp/fedbip_instruct")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the report from <workdir>/<name>.json of a finished run "
                         "(give the same --set)")
    ap.add_argument("--preamble", type=Path, default=None, help="markdown placed after the header")
    return ap.parse_args(argv)


def collect(args: argparse.Namespace, setting: str, seeds: list[int],
            partial: Path) -> list[dict]:
    """Every (seed, strategy): recorded in ``partial`` by an interrupted run, else run now."""
    done = load_partial(partial, lambda r: (r["strategy"], r["seed"]))
    results: list[dict] = []
    for seed in seeds:
        for strategy in args.strategies.split(","):
            if (strategy, seed) in done:
                results.append(done[(strategy, seed)])
                continue
            res = run_recorded(partial, f"{strategy}/seed {seed}", run_one,
                               setting, strategy, seed, args.overrides, Path(args.workdir))
            if res is None:
                continue
            results.append(res)
            print(f"{strategy:>13} seed {seed}: average {res['scores']['average']:.3f} "
                  f"({res['wall']:.0f}s, {np.mean(res['round_seconds']):.1f}s/round)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run (or resume, or only report) the benchmark and write its report."""
    args = parse_args(argv)
    setting = args.setting or ("tiny" if args.quick else "smollm2")
    seeds = parse_seeds(args.seeds, args.quick)
    name = "instruct_quick.md" if args.quick else "instruct.md"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    command = command_line("instruct.py", argv)
    preamble = args.preamble.read_text() if args.preamble else ""
    raw = Path(args.workdir) / f"{out.stem}.json"
    if args.report_only:
        if not raw.is_file():
            print(f"--report-only: {raw} not found (run the benchmark first)", file=sys.stderr)
            return 2
        results = json.loads(raw.read_text())
        print(write_report(results, setting, out, command, sorted({r["seed"] for r in results}),
                           args.overrides, preamble))
        return 0
    partial = out.with_suffix(".partial.jsonl")
    results = collect(args, setting, seeds, partial)
    if not results:
        print("no run finished", file=sys.stderr)
        return 2
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1))
    print(write_report(results, setting, out, command, seeds, args.overrides, preamble))
    print(f"raw results: {raw}")
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
