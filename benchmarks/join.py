"""Join benchmark: leave clients out, federate the rest, join the held-out ones.

Per (setting, seed): the clients are drawn from one data pool; ``--holdout`` clients per group
are held out; the rest federate with ``fedbip`` (the default options), ``fedavg`` and
``oracle`` (FedAvg inside the true groups). Each held-out client then joins the ``fedbip`` run
(``fedbip join``) with 10, 25 and 50 training examples (``--train-sizes``) and a fixed-size test
split, and every method is scored on the newcomers' test splits:

- ``join``: the joined adapter (FedBip aggregate over the stored clients, validation gate);
- ``local``: the newcomer's own fine-tune of the run's initial adapter (same epochs);
- ``fedavg``: the FedAvg global model as is; ``fedavg-ft``: it after the same local fine-tune;
- ``oracle-ft``: the newcomer's true group's FedAvg model after the same local fine-tune;
- ``in-group``: the share of the join's weight on stored clients that goes to its own group.

    python benchmarks/join.py --quick                     # tiny BERT, synthetic text (minutes)
    python benchmarks/join.py --setting nlp-groups        # MiniLM, Rotten Tomatoes, 2 groups
    python benchmarks/join.py --setting nlp-natural       # MiniLM, Rotten Tomatoes by movie
    python benchmarks/join.py --setting generative        # SmolLM2, instruct-tasks by task

Generative settings group the clients by instruction task (``instruct-tasks``: the conflicting
``sentiment`` / ``sentiment-flipped`` pair); the score is the primary metric of
``benchmarks/instruct.py`` (greedy generation, exact match; ROUGE-L for record-to-text).

Writes benchmarks/results/join_<setting>.md (``join_quick.md`` with --quick), the raw rows
(``.json``) and a PNG next to it, after every seed. ``--report-only ROWS`` rebuilds a report
from its rows; ``--combine [--preamble FILE]`` writes join.md from the settings' reports.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedbip_ray.config import DataConfig, config_from_dict  # noqa: E402
from fedbip_ray.data.datasets import load_dataset  # noqa: E402

METHODS = ("join", "local", "fedavg", "fedavg-ft", "oracle-ft")
GOAL_SIZE = 25  # the local-only goal is read at this many examples (or the nearest size below)


@dataclass(frozen=True)
class Setting:
    """A leave-clients-out setting: model, dataset, clients per group, examples per client."""

    model: dict[str, Any]
    dataset: str
    groups: int  # 0: natural clients (one per key of the dataset's client column)
    clients_per_group: int
    examples: int
    train: dict[str, Any]
    rounds: int
    test_examples: int = 60  # per newcomer
    command: str = ""  # the full run of this setting (results file)
    tasks: tuple[str, ...] = ()  # generative: group g's clients all hold task ``tasks[g]``

    @property
    def generative(self) -> bool:
        return bool(self.tasks)

    @property
    def metric(self) -> str:
        return "score (exact match)" if self.generative else "accuracy"


TINY = {"name": "tiny-bert", "max_length": 24, "peft": {"r": 4, "alpha": 8, "dropout": 0.0}}
MINILM = {"name": "minilm", "max_length": 64, "peft": {"r": 8, "alpha": 16}}
SETTINGS = {
    "tiny-groups": Setting(TINY, "synthetic-text", 2, 3, 60,
                           {"local_epochs": 3, "batch_size": 16, "lr": 0.02}, 2),
    "nlp-groups": Setting(MINILM, "rotten-tomatoes", 2, 5, 200,
                          {"local_epochs": 2, "batch_size": 16, "lr": 0.002}, 8,
                          command="python benchmarks/join.py --setting nlp-groups --seeds 0,1,2"),
    # natural clients: one Rotten Tomatoes movie each (at most 35 snippets per movie)
    "nlp-natural": Setting(MINILM, "rotten-tomatoes", 0, 20, 30,
                           {"local_epochs": 2, "batch_size": 16, "lr": 0.002}, 8, 5,
                           command="python benchmarks/join.py --setting nlp-natural --seeds 0,1,2 "
                           "--holdout 10 --train-sizes 10,20"),
}
SMOLLM2 = {"name": "smollm2", "task": "causal-lm", "max_length": 96,
           "peft": {"r": 8, "alpha": 16, "dropout": 0.05}}
TINY_LLAMA = {"name": "tiny-llama", "task": "causal-lm", "max_length": 64,
              "tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                       "intermediate_size": 32},
              "peft": {"r": 4, "alpha": 8, "dropout": 0.0}}
CONFLICT = ("sentiment", "sentiment-flipped")
SETTINGS |= {
    # CPU-sized: 2 tasks x 2 clients, 2 rounds, 1 newcomer per task
    "generative": Setting(SMOLLM2, "instruct-tasks", 2, 2, 40,
                          {"local_epochs": 1, "batch_size": 8, "lr": 0.002,
                           "eval_batch_size": 16}, 2, 20,
                          command="python benchmarks/join.py --setting generative --seeds 0,1 "
                          "--holdout 1 --train-sizes 10,25", tasks=CONFLICT),
    # pipeline check only (random-init model)
    "tiny-generative": Setting(TINY_LLAMA, "instruct-tasks", 2, 2, 16,
                               {"local_epochs": 1, "batch_size": 8, "lr": 0.01,
                                "eval_batch_size": 8}, 1, 8, tasks=CONFLICT),
}


def pool(setting: Setting, seed: int) -> pd.DataFrame:
    """The data pool: columns text, label, client (natural client key); generative: also
    prompt, response, task."""
    cfg = DataConfig(dataset=setting.dataset, num_clients=1)
    frame = load_dataset(cfg, seed).frame.sample(frac=1.0, random_state=seed)
    return frame.reset_index(drop=True)


def split_clients(setting: Setting, frame: pd.DataFrame, holdout: int, sizes: list[int],
                  seed: int) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """(federated rows with a ``key`` column, one frame per newcomer with ``user``/``group``).

    Grouped settings: client rows are drawn in turn from the pool, group g's labels shifted
    by g (label flip); natural settings: the most frequent keys federate, the next ones join.
    """
    need_new = max(sizes) + max(4, max(sizes) // 2) + setting.test_examples
    if setting.generative:
        return split_tasks(setting, frame, holdout, need_new)
    if setting.groups:
        fed, new, at = [], [], 0
        for g in range(setting.groups):
            for _ in range(setting.clients_per_group):
                rows = frame.iloc[at:at + setting.examples].assign(key=f"g{g}")
                fed.append(rows.assign(label=(rows["label"] + g) % 2))
                at += setting.examples
            for h in range(holdout):
                rows = frame.iloc[at:at + need_new].assign(user=f"g{g}-new{h}", group=g)
                new.append(rows.assign(label=(rows["label"] + g) % 2))
                at += need_new
        return pd.concat(fed, ignore_index=True), new
    counts = frame["client"].value_counts()
    keys = [k for k, c in counts.items() if c >= setting.examples][: setting.clients_per_group]
    spare = [k for k, c in counts.items() if c >= need_new and k not in keys][:holdout]
    fed = frame[frame["client"].isin(keys)].groupby("client").head(setting.examples)
    new = [frame[frame["client"] == k].head(need_new).assign(user=str(k), group=-1)
           for k in spare]
    return fed.rename(columns={"client": "key"}), new


def split_tasks(setting: Setting, frame: pd.DataFrame, holdout: int,
                need_new: int) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Generative: group g's clients (key ``g<g>``) and newcomers draw task ``tasks[g]``'s
    rows (prompt, response, task) in turn."""
    fed, new = [], []
    cols = ["prompt", "response", "task"]
    for g, task in enumerate(setting.tasks):
        rows = frame[frame["task"] == task][cols].reset_index(drop=True)
        at = setting.clients_per_group * setting.examples
        if at + holdout * need_new > len(rows):
            print(f"join benchmark: task {task} has {len(rows)} rows, the setting needs "
                  f"{at + holdout * need_new}", file=sys.stderr)
            raise SystemExit(2)
        fed.append(rows.iloc[:at].assign(key=f"g{g}"))
        for h in range(holdout):
            new.append(rows.iloc[at:at + need_new].assign(user=f"{task}-new{h}", group=g))
            at += need_new
    return pd.concat(fed, ignore_index=True), new


def data_config(setting: Setting, data_path: Path, clients: int) -> dict[str, Any]:
    """The federation's ``data`` section: the federated file, one client column partition."""
    columns = ({"prompt_column": "prompt", "response_column": "response", "task_column": "task"}
               if setting.generative else {"text_column": "text", "label_column": "label"})
    return {"dataset": "file", "path": str(data_path), **columns, "client_column": "key",
            "num_clients": clients, "examples_per_client": setting.examples,
            "partition": {"kind": "column"}}


def base_config(setting: Setting, data_path: Path, clients: int, seed: int,
                strategy: str) -> dict[str, Any]:
    return {
        "name": f"join-{strategy}", "seed": seed, "model": setting.model,
        "data": data_config(setting, data_path, clients),
        "train": setting.train, "strategy": {"name": strategy},
        "federation": {"rounds": setting.rounds}, "resources": {"num_cpus_per_client": 1},
        "tracking": {"mlflow": False},
    }


def split_overrides(n: int, test: int) -> list[str]:
    """Fractions that give a newcomer with ``n`` training examples ``test`` test examples."""
    val = max(4, n // 2)
    total = n + val + test
    return [f"data.test_fraction={(test + 0.25) / total:.6f}",
            f"data.val_fraction={(val + 0.25) / total:.6f}", "tracking.mlflow=false"]


def baselines(runs: dict[str, Path], data: Path, overrides: list[str],
              groups: list[int]) -> dict[str, dict[int, float]]:
    """Test accuracy per newcomer (by client id) of fedavg, fedavg-ft and oracle-ft."""
    from fedbip_ray.runtime.join import NewcomerPool, load_run
    from fedbip_ray.runtime.join_data import read_newcomers, write_newcomer_shard

    avg = load_run(runs["fedavg"], overrides)
    newcomers = read_newcomers(data, avg.cfg, avg.shards, "user")
    shards = [write_newcomer_shard(n, avg.cfg, data.parent / "baseline_shards") for n in newcomers]
    ft = avg.cfg.train.local_epochs
    pool_ = NewcomerPool(avg, shards)
    try:
        ids = [s.newcomer.client_id for s in shards]
        glob = {c: avg.states[0] for c in ids}
        out = {"fedavg": pool_.evaluate(glob), "fedavg-ft": pool_.evaluate(glob, ft)}
        if "oracle" in runs:
            orc = load_run(runs["oracle"])
            member = {g: orc.shards.groups.index(g) for g in set(orc.shards.groups)}
            states = {c: orc.states[member[g]] for c, g in zip(ids, groups, strict=True)}
            out["oracle-ft"] = pool_.evaluate(states, ft)
    finally:
        pool_.close()
    return {m: {c: r["test"]["accuracy"] for c, r in res.items()} for m, res in out.items()}


def run_seed(name: str, setting: Setting, seed: int, holdout: int, sizes: list[int],
             work: Path) -> list[dict[str, Any]]:
    """Every method's newcomer test accuracy for one seed: one row per (newcomer, size)."""
    from fedbip_ray.runtime.federation import run_federation
    from fedbip_ray.runtime.join import join_run

    d = work / f"{name}_seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    fed, new = split_clients(setting, pool(setting, seed), holdout, sizes, seed)
    fed.to_parquet(d / "federated.parquet")
    clients = setting.groups * setting.clients_per_group if setting.groups else fed["key"].nunique()
    runs = {}
    for strategy in ("fedbip", "fedavg", *(("oracle",) if setting.groups else ())):
        cfg = config_from_dict(base_config(setting, d / "federated.parquet", clients, seed,
                                           strategy))
        out = d / strategy
        if not (out / "summary.json").is_file():
            run_federation(cfg, out, echo=lambda s: None)
        runs[strategy] = out
    rows = []
    for n in sizes:
        val = max(4, n // 2)
        frames = [f.head(n + val + setting.test_examples) for f in new]
        data = d / f"new_{n}" / "newcomers.parquet"
        data.parent.mkdir(exist_ok=True)
        pd.concat(frames, ignore_index=True).to_parquet(data)
        groups = [int(f["group"].iloc[0]) for f in frames]
        splits = split_overrides(n, setting.test_examples)
        joined = join_run(runs["fedbip"], data, "user", splits, data.parent / "join",
                          echo=lambda s: None)
        base = baselines(runs, data, splits, groups)
        for r, g in zip(joined, groups, strict=True):
            rows.append({"seed": seed, "n": n, "newcomer": r.name, "group": g,
                         "join": r.test["accuracy"], "local": r.local_test["accuracy"],
                         "mix": r.mix, "in_group": r.group_share(g) if g >= 0 else None,
                         **{m: v[r.client_id] for m, v in base.items()}})
    return rows


def mean_std(values: list[float | None]) -> str:
    v = [x for x in values if x is not None]
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "n/a"


def paired(rows: list[dict], a: str, b: str) -> tuple[float, float, int] | None:
    """Mean of ``a − b`` over the rows that have both, its standard error and the count."""
    d = [r[a] - r[b] for r in rows if r.get(a) is not None and r.get(b) is not None]
    if not d:
        return None
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(np.mean(d)), se, len(d)


def goal_lines(rows: list[dict]) -> list[str]:
    """The join's goals, each read from paired differences (points = score x 100): within 2
    points of oracle-ft, at least 5 points over local-only at ``GOAL_SIZE`` examples, never
    below fedavg-ft by more than noise (2 standard errors)."""
    sizes = sorted({r["n"] for r in rows})
    at = max([n for n in sizes if n <= GOAL_SIZE], default=sizes[0])
    out = ["| goal | train examples | join minus baseline (points, mean ± s.e., pairs) | met |",
           "|---|---|---|---|"]

    def line(goal: str, n: int, base: str, ok: Callable[[float, float], bool]) -> None:
        res = paired([r for r in rows if r["n"] == n], "join", base)
        if res is None:
            out.append(f"| {goal} | {n} | n/a | n/a |")
            return
        m, se, k = res
        out.append(f"| {goal} | {n} | {100 * m:+.1f} ± {100 * se:.1f} ({k}) | "
                   f"{'yes' if ok(m, 0.0 if se != se else se) else 'no'} |")

    for n in sizes:
        line("within 2 points of oracle-ft", n, "oracle-ft", lambda m, se: m >= -0.02)
    line("≥ 5 points over local-only", at, "local", lambda m, se: m >= 0.05)
    for n in sizes:
        line("not below fedavg-ft beyond noise (2 s.e.)", n, "fedavg-ft",
             lambda m, se: m >= -2 * se)
    return out


def setting_line(name: str, setting: Setting, args: argparse.Namespace) -> str:
    """What was federated and joined."""
    model = setting.model["name"]
    if setting.generative:
        who = (f"{setting.groups} groups = tasks {', '.join(setting.tasks)} x "
               f"{setting.clients_per_group} clients")
    elif setting.groups:
        who = f"{setting.groups} label-flipped groups x {setting.clients_per_group} clients"
    else:
        who = f"up to {setting.clients_per_group} natural clients"
    per = "per group" if setting.groups else "in all"
    return (f"Setting `{name}`: `{model}` + LoRA r={setting.model['peft']['r']}; {who}, "
            f"{setting.examples} examples each, {setting.rounds} rounds x "
            f"{setting.train['local_epochs']} local epoch(s); {args.holdout} held-out clients "
            f"{per}, each with a test split of {setting.test_examples} examples.")


def command_text(args: argparse.Namespace) -> str:
    """The command that ran the setting (without --report-only and its file)."""
    argv, skip = [], False
    for a in args.argv:
        if skip or a == "--report-only":
            skip = not skip
            continue
        argv.append(a)
    text = f"`{shlex.join(['python', 'benchmarks/join.py', *argv])}`"
    return text + (f" (report rebuilt from `{args.report_only}`)" if args.report_only else "")


def report(name: str, rows: list[dict], args: argparse.Namespace, seconds: float | None,
           out: Path) -> None:
    """The markdown table (mean ± std over newcomers and seeds), the goals and the PNG."""
    setting = SETTINGS[name]
    sizes = sorted({r["n"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    methods = [m for m in METHODS if any(m in r for r in rows)]
    took = f"{seconds / 60:.1f} minutes" if seconds is not None else "run time in its log"
    lines = [f"# Join benchmark{' (quick)' if args.quick else ''}: {name}", "",
             f"Command: {command_text(args)}  ",
             f"Seeds {','.join(map(str, seeds))} (asked: {args.seeds}); "
             f"{took} on 2 shared CPU cores.", "",
             setting_line(name, setting, args), "",
             f"Test {setting.metric} on the newcomers' own test splits (mean ± std over "
             "newcomers x seeds); `in-group`: share of the join's stored-client weight on the "
             "newcomer's own group; `mix`: the gate's mean λ.", "",
             "| train examples | " + " | ".join(methods) + " | in-group | mix |",
             "|---|" + "---|" * (len(methods) + 2)]
    for n in sizes:
        sel = [r for r in rows if r["n"] == n]
        cells = [mean_std([r.get(m) for r in sel]) for m in methods]
        cells += [mean_std([r["in_group"] for r in sel]), mean_std([r["mix"] for r in sel])]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (paired by newcomer and seed):", "", *goal_lines(rows), "",
              f"![join: {name}]({out.with_suffix('.png').name})"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    plot(rows, methods, out.with_suffix(".png"), name, setting.metric)


def plot(rows: list[dict], methods: list[str], path: Path, title: str,
         metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ys = [np.mean([r[m] for r in rows if r["n"] == n and r.get(m) is not None]) for n in sizes]
        ax.plot(sizes, ys, marker="o", label=m)
    ax.set_xlabel("newcomer training examples")
    ax.set_ylabel(f"newcomer test {metric}")
    ax.set_title(f"join: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMBINED = ("nlp-groups", "nlp-natural", "generative")


def combine(results: Path, preamble: str) -> Path:
    """``join.md``: ``preamble``, then every setting's report found in ``results`` (headings
    one level down), then the commands of the settings not run yet."""
    lines = ["# Join benchmark: new clients joining a finished run", ""]
    lines += [preamble.strip(), ""] if preamble.strip() else []
    missing = []
    for name in COMBINED:
        part = results / f"join_{name}.md"
        if not part.is_file():
            missing.append(f"- {name}: `{SETTINGS[name].command}` (not run yet)")
            continue
        lines += ["#" + x if x.startswith("#") else x for x in part.read_text().splitlines()]
        lines.append("")
    if missing:
        lines += ["## Not run yet", "", *missing, ""]
    out = results / "join.md"
    out.write_text("\n".join(lines))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny BERT on synthetic text")
    ap.add_argument("--setting", choices=list(SETTINGS), default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--holdout", type=int, default=2, help="held-out clients per group")
    ap.add_argument("--train-sizes", default="10,25,50")
    ap.add_argument("--workdir", default="runs/bench-join")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report-only", metavar="ROWS", default=None,
                    help="rebuild the setting's report from a finished run's rows (.json)")
    ap.add_argument("--combine", action="store_true",
                    help="write join.md from the join_<setting>.md reports next to --out")
    ap.add_argument("--preamble", type=Path, default=None, help="markdown for --combine")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.sizes = [int(s) for s in args.train_sizes.split(",")]
    except ValueError:
        ap.error("--seeds and --train-sizes take comma-separated integers")
    for path in (args.report_only, args.preamble):
        if path is not None and not Path(path).is_file():
            ap.error(f"{path}: file not found")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run a setting (or rebuild its report, or combine the reports)."""
    args = parse_args(argv)
    name = args.setting or ("tiny-groups" if args.quick else "nlp-groups")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "join_quick.md" if args.quick else f"join_{name}.md")
    if args.combine:
        print(combine(out.parent, args.preamble.read_text() if args.preamble else ""))
        return 0
    if args.report_only:
        report(name, json.loads(Path(args.report_only).read_text()), args, None, out)
        print(out.read_text())
        return 0
    t0 = time.perf_counter()
    rows = []
    for seed in args.seed_list:
        rows += run_seed(name, SETTINGS[name], seed, args.holdout, args.sizes,
                         Path(args.workdir))
        report(name, rows, args, time.perf_counter() - t0, out)  # partial results as it goes
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
