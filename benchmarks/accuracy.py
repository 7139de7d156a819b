"""Accuracy benchmark: settings x strategies x seeds through the same runtime users run.

Every run is a real federation (`run_federation` on an embedded local Ray) on identical
partitions per (setting, seed). Each client is scored on its own held-out test split; the
reported accuracy is taken at the round with the best mean *validation* accuracy (model
selection never looks at test), next to the final round's.

    python benchmarks/accuracy.py --quick                       # CI-sized, tiny models (~minutes)
    python benchmarks/accuracy.py                                # full suite (MiniLM, EfficientNet)
    python benchmarks/accuracy.py --settings nlp-conflict --strategies fedbip,oracle --seeds 0

Writes benchmarks/results/accuracy.md (or --out) and one PNG per setting next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
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
    parse_strategy,
    plot_curves,
    preamble_lines,
    run_dirname,
    run_recorded,
    strategy_config,
)
from fedbip_ray.config import config_from_dict  # noqa: E402

__all__ = ["SETTINGS", "STRATEGIES", "main", "parse_strategy", "select"]

STRATEGIES = ["local", "fedavg", "fedavg-ft", "fedprox", "fedamp", "fedbip-paper", "fedbip",
              "fedbip-layer", "oracle", "fedsa-lora", "feddpa", "fedala", "fedawa"]
PEERS = ["fedsa-lora", "feddpa", "fedala", "fedawa"]  # the 2023-2025 methods


def _preset(model: dict, dataset: str, clients: int, examples: int, epochs: int, batch: int,
            lr: float, rounds: int) -> dict[str, Any]:
    """A setting's base config (dict form), without its partition."""
    return {
        "model": model,
        "data": {"dataset": dataset, "num_clients": clients, "examples_per_client": examples},
        "train": {"local_epochs": epochs, "batch_size": batch, "lr": lr},
        "federation": {"rounds": rounds},
    }


def _partition(kind: str, **params: Any) -> dict[str, Any]:
    """The config part that selects a partition."""
    return {"data": {"partition": {"kind": kind, **params}}}


_NLP = _preset({"name": "minilm", "max_length": 48, "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
               "rotten-tomatoes", 6, 200, epochs=2, batch=16, lr=0.002, rounds=5)
_CV = _preset({"name": "efficientnet-lite0", "task": "image-classification"},
              "fashion-mnist", 8, 150, epochs=1, batch=32, lr=0.003, rounds=5)
_TINY = _preset({"name": "tiny-bert", "max_length": 24,
                 "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
                "synthetic-text", 6, 60, epochs=3, batch=16, lr=0.02, rounds=4)
_TINY_CV = _preset({"name": "tiny-cnn", "task": "image-classification"},
                   "digits", 6, 100, epochs=2, batch=16, lr=0.01, rounds=4)

SETTINGS: dict[str, tuple[dict, dict]] = {
    "nlp-conflict": (_NLP, _partition("groups", num_groups=2, shift="label-flip")),
    "nlp-dirichlet": (_NLP, _partition("dirichlet", alpha=0.1)),
    "cv-rotation": (_CV, _partition("groups", num_groups=4, shift="rotation")),
    "cv-dirichlet": (_CV, _partition("dirichlet", alpha=0.1)),
    # task shift: 2 classification tasks over one label space, 3 clients per task
    "nlp-tasks": (_NLP, merge(_partition("column"),
                              {"data": {"dataset": "rotten-tomatoes-tasks"}})),
    "tiny-conflict": (_TINY, _partition("groups", num_groups=2, shift="label-flip")),
    "tiny-dirichlet": (_TINY, _partition("dirichlet", alpha=0.1)),
    "tiny-cv-rotation": (_TINY_CV, _partition("groups", num_groups=2, shift="rotation")),
}
FULL = ["nlp-conflict", "nlp-tasks", "nlp-dirichlet", "cv-rotation", "cv-dirichlet"]
QUICK = ["tiny-conflict", "tiny-dirichlet"]
BASELINES = ["local", "fedavg", "fedavg-ft", "fedprox", "fedamp", "fedbip-paper"]


def setting_config(setting: str, strategy: str, seed: int, overrides: list[str]) -> Any:
    """The validated config of one run."""
    base, extra = SETTINGS[setting]
    data = merge(merge(base, extra), strategy_config(setting, strategy, seed))
    return config_from_dict(data, overrides)


def select(history: list[dict]) -> dict[str, Any]:
    """Scores of one run: test accuracy at the best-validation round, and at the last round."""
    rows = [r for r in history if r.get("mean_accuracy") is not None]
    best = max(rows, key=lambda r: (r["mean_val_accuracy"]
                                    if r["mean_val_accuracy"] is not None else -1))
    final = rows[-1]
    target = 0.95 * final["mean_accuracy"]
    to95 = next(r["round"] for r in rows if r["mean_accuracy"] >= target)
    return {
        "selected_round": best["round"], "mean": best["mean_accuracy"],
        "worst10": best["worst10_accuracy"], "val": best["mean_val_accuracy"],
        "final_mean": final["mean_accuracy"], "final_worst10": final["worst10_accuracy"],
        "rounds_to_95": to95, "curve": [(r["round"], r["mean_accuracy"]) for r in rows],
        "per_client": best.get("per_client_accuracy"),
    }


def run_dir(workdir: Path, setting: str, strategy: str, seed: int) -> Path:
    """Where one run writes its outputs."""
    return workdir / setting / run_dirname(strategy, seed)


def group_stats(out: Path) -> dict[str, float]:
    """In-group weight share and ARI of the last aggregation, when the clients have groups."""
    from fedbip_ray.core.grouping import group_recovery

    sim_file, clients = out / "similarity.jsonl", out / "shards" / "clients.json"
    if not sim_file.is_file() or not clients.is_file():
        return {}
    groups = np.asarray([c["group"] for c in json.loads(clients.read_text())["clients"]])
    lines = sim_file.read_text().splitlines()
    if not lines or len(np.unique(groups)) < 2:
        return {}
    last = json.loads(lines[-1])
    g = groups[np.asarray(last["clients"])]
    rec = group_recovery(np.asarray(last["similarity"]), np.asarray(last["weights"]), g)
    return {"group_share": rec["in_group_weight_share"], "ari": rec["adjusted_rand_index"]}


def client_test_sizes(out: Path) -> dict[str, int]:
    """Each client's number of test examples (``{client: n}``), from the run's shard index."""
    path = out / "shards" / "clients.json"
    if not path.is_file():
        return {}
    return {str(c["client"]): int(c["test"]) for c in json.loads(path.read_text())["clients"]}


def val_stats(out: Path) -> dict[str, float]:
    """Mean validation accuracy and per-client test accuracies at the selected
    (best-validation) round, from metrics.jsonl."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    sel = select([json.loads(x) for x in path.read_text().splitlines()])
    return {"val": sel["val"], "per_client": sel["per_client"]}


def run_one(setting: str, strategy: str, seed: int, overrides: list[str],
            workdir: Path) -> dict[str, Any]:
    """One federation, scored by :func:`select`, with its group statistics and wall time."""
    from fedbip_ray.runtime.federation import run_federation

    cfg = setting_config(setting, strategy, seed, overrides)
    out = run_dir(workdir, setting, strategy, seed)
    t0 = time.perf_counter()
    run_federation(cfg, out, echo=lambda s: None)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    res = select(history)
    res.update(setting=setting, strategy=strategy, seed=seed, wall=time.perf_counter() - t0)
    res.update(group_stats(out), test_n=client_test_sizes(out))
    return res


def table(results: list[dict], setting: str) -> list[str]:
    """Markdown table of one setting: a row per strategy, means ± std over seeds."""
    lines = [f"### {setting}", "",
             "| strategy | seeds | mean acc (val-selected) | worst-10% | final-round mean "
             "| mean val acc (selected round) | rounds to 95% | wall s | in-group weight share "
             "| ARI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for strategy in dict.fromkeys(r["strategy"] for r in results if r["setting"] == setting):
        rs = [r for r in results if r["setting"] == setting and r["strategy"] == strategy]
        lines.append(
            f"| {strategy} | {len(rs)} | {mean_std([r['mean'] for r in rs])} "
            f"| {mean_std([r['worst10'] for r in rs])} | "
            f"{mean_std([r['final_mean'] for r in rs])} | {mean_std([r.get('val') for r in rs])} | "
            f"{np.mean([r['rounds_to_95'] for r in rs]):.1f} | "
            f"{np.mean([r['wall'] for r in rs]):.0f} | "
            f"{mean_std([r.get('group_share') for r in rs])} | "
            f"{mean_std([r.get('ari') for r in rs])} |")
    lines.append("")
    return lines


def _mean_of(results: list[dict], setting: str, strategy: str, key: str) -> float | None:
    v = [r[key] for r in results if r["setting"] == setting and r["strategy"] == strategy
         and r.get(key) is not None]
    return float(np.mean(v)) if v else None


def _goal_row(results: list[dict], st: str, method: str) -> str | None:
    """One setting's row of the goals table (None: ``method`` did not run there)."""
    m = _mean_of(results, st, method, "mean")
    if m is None:
        return None
    base = {b: _mean_of(results, st, b, "mean") for b in BASELINES}
    base = {k: v for k, v in base.items() if v is not None}
    best = max(base, key=base.get) if base else None
    oracle = _mean_of(results, st, "oracle", "mean")
    peers = {p: _mean_of(results, st, p, "mean") for p in PEERS}
    peers = {k: v for k, v in peers.items() if v is not None}
    best_peer = max(peers, key=peers.get) if peers else None
    fa, lo = base.get("fedavg"), base.get("local")
    w, wl = _mean_of(results, st, method, "worst10"), _mean_of(results, st, "local", "worst10")
    r95 = _mean_of(results, st, method, "rounds_to_95")
    r95a = _mean_of(results, st, "fedavg", "rounds_to_95")

    def diff(x: float | None) -> str:
        return "n/a" if x is None else f"{m - x:+.3f}"

    seeds = len({r["seed"] for r in results if r["setting"] == st and r["strategy"] == method})
    peer = f"{best_peer} {peers[best_peer]:.3f}" if best_peer else "n/a"
    return (f"| {st} | {seeds} | {m:.3f} | {best or 'n/a'} {base.get(best, float('nan')):.3f} "
            f"| {diff(base.get(best))} | {peer} | {diff(peers.get(best_peer))} "
            f"| {diff(oracle)} | {diff(fa)} | {diff(lo)} | "
            f"{'n/a' if w is None or wl is None else f'{w - wl:+.3f}'} | "
            f"{'n/a' if r95 is None or not r95a else f'{r95:.1f} / {r95a:.1f}'} |")


def goal_lines(results: list[dict], settings: list[str], method: str = "fedbip") -> list[str]:
    """The goals checked against the measured means (over seeds) of ``method``."""
    lines = [f"### Goals ({method}, means over seeds)", "",
             "| setting | seeds | " + method + " | best baseline (not oracle) | vs best baseline "
             "| best 2023-2025 peer | vs best of the 2023-2025 peers "
             "| vs oracle | vs fedavg | vs local | worst-10% vs local | rounds to 95%: "
             + method + " / fedavg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = (_goal_row(results, st, method) for st in settings)
    lines += [row for row in rows if row is not None]
    lines.append("")
    return lines


def paired_table(results: list[dict], setting: str, reference: str = "fedbip") -> list[str]:
    """``reference`` minus every other strategy of ``setting``, paired by seed: mean ± std of
    the differences in val-selected test accuracy, worst-10% and selected validation accuracy."""
    def col(strategy: str, key: str) -> dict[int, float]:
        return {r["seed"]: (math.nan if r.get(key) is None else float(r[key])) for r in results
                if r["setting"] == setting and r["strategy"] == strategy}

    rows = []
    for strategy in dict.fromkeys(r["strategy"] for r in results if r["setting"] == setting):
        if strategy == reference or paired(col(reference, "mean"), col(strategy, "mean")) is None:
            continue
        cells = [paired(col(reference, k), col(strategy, k)) for k in ("mean", "worst10", "val")]
        n, wins = cells[0][2], cells[0][3]
        diffs = ["n/a" if c is None else f"{c[0]:+.3f} ± {c[1]:.3f}" for c in cells]
        rows.append(f"| {strategy} | {n} | " + " | ".join(diffs) + f" | {wins}/{n} |")
    if not rows:
        return []
    return [f"{setting}: {reference} minus each strategy, paired by seed (mean ± std of the "
            "differences):", "",
            "| strategy | seeds | mean acc | worst-10% | val acc | seeds where "
            f"{reference} is higher |", "|---|---|---|---|---|---|", *rows, ""]


@dataclass(frozen=True)
class ClientGap:
    """One client of one seed: its test accuracy under a method and under a reference."""

    seed: int
    client: str
    n: int
    acc: float
    ref: float

    @property
    def diff(self) -> float:
        return self.acc - self.ref

    @property
    def se(self) -> float:
        """Two-proportion standard error ``sqrt((a(1-a) + r(1-r)) / n)`` of the difference
        (it ignores that both models are scored on the same examples)."""
        return math.sqrt((self.acc * (1 - self.acc) + self.ref * (1 - self.ref)) / self.n)


def client_gaps(results: list[dict], setting: str, method: str,
                reference: str = "local") -> list[ClientGap]:
    """Per-client accuracies of ``method`` and ``reference`` at their own selected rounds,
    paired by seed and client (only seeds where both recorded per-client scores and sizes)."""
    def runs(strategy: str) -> dict[int, dict]:
        return {r["seed"]: r for r in results if r["setting"] == setting
                and r["strategy"] == strategy and r.get("per_client") and r.get("test_n")}

    mine, ref = runs(method), runs(reference)
    gaps = []
    for seed in sorted(set(mine) & set(ref)):
        a, b, n = mine[seed]["per_client"], ref[seed]["per_client"], mine[seed]["test_n"]
        gaps += [ClientGap(seed, c, int(n[c]), float(a[c]), float(b[c]))
                 for c in sorted(a, key=int)
                 if c in b and n.get(c) and a[c] == a[c] and b[c] == b[c]]
    return gaps


def client_gap_lines(results: list[dict], settings: list[str], method: str = "fedbip",
                     reference: str = "local") -> list[str]:
    """Does any client lose to ``reference`` by more than the noise of its test split?"""
    rows = []
    for st in settings:
        gaps = client_gaps(results, st, method, reference)
        if not gaps:
            continue
        worst = min(gaps, key=lambda g: g.diff)
        beyond = [sum(g.diff < -k * g.se - 1e-12 for g in gaps) for k in (1, 2)]
        rows.append(f"| {st} | {len({g.seed for g in gaps})} | {len(gaps)} "
                    f"| {np.mean([g.diff for g in gaps]):+.3f} "
                    f"| {worst.diff:+.3f} (client {worst.client}, seed {worst.seed}, "
                    f"n={worst.n}, SE {worst.se:.3f}) | {beyond[0]} | {beyond[1]} |")
    if not rows:
        return []
    return [f"### Clients: {method} against {reference}, one by one", "",
            f"Each client's test accuracy under {method} minus under {reference} (each at its "
            "own validation-selected round), paired by seed. SE is the two-proportion standard "
            "error of that difference, sqrt((a(1-a) + r(1-r)) / n) with n the client's test "
            "examples.", "",
            "| setting | seeds | client-seeds | mean difference | largest loss | below by > 1 SE "
            "| below by > 2 SE |", "|---|---|---|---|---|---|---|", *rows, ""]


def write_report(results: list[dict], settings: list[str], out: Path, command: str,
                 seeds: list[int], preamble: str = "") -> str:
    """Write ``out`` (markdown), one PNG per setting next to it and the results as JSON."""
    lines = ["# Accuracy benchmark", "",
             f"Command: `{command}`  ",
             machine_line(seeds), "", *preamble_lines(preamble),
             "Mean client accuracy = mean over clients of each client's accuracy on its own test "
             "split, at the round with the best mean validation accuracy (mean ± std over seeds). "
             "Worst-10% = mean of the lowest 10% of clients (at least one). Rounds to 95% = first "
             "round reaching 95% of the final round's mean accuracy.", ""]
    variants = dict.fromkeys(r["strategy"] for r in results
                             if r["strategy"].startswith(("fedbip[gate_memory",
                                                          "fedbip[gate_ties",
                                                          "fedbip[lora_exact")))
    for method in ["fedbip", *variants]:
        lines += goal_lines(results, settings, method)
    lines += client_gap_lines(results, settings)
    for s in settings:
        lines += table(results, s)
        lines += paired_table(results, s)
        png = out.with_name(f"{out.stem}_{s}.png")
        plot_curves([r for r in results if r["setting"] == s], png,
                    f"{s}: mean client test accuracy per round", "accuracy")
        lines += [f"![{s}]({png.name})", ""]
    text = "\n".join(lines)
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = bench_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help=f"settings {QUICK}, 1 seed")
    ap.add_argument("--settings", help=f"comma list from {sorted(SETTINGS)}")
    add_run_args(ap, STRATEGIES, "/tmp/fedbip_accuracy")
    ap.add_argument("--preamble", type=Path, default=None,
                    help="markdown file inserted after the report's header (reading notes)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the results recorded so far (an interrupted run's "
                         "partial file) without running anything")
    return ap.parse_args(argv)


def _recorded(done: dict, workdir: Path, key: tuple[str, str, int]) -> dict:
    """A result from the partial file, completed with what older runs did not record."""
    res = done[key]
    if "group_share" not in res:
        res.update(group_stats(run_dir(workdir, *key)))
    if res.get("val") is None or res.get("per_client") is None:
        res.update({k: v for k, v in val_stats(run_dir(workdir, *key)).items()
                    if res.get(k) is None})
    if not res.get("test_n"):
        res["test_n"] = client_test_sizes(run_dir(workdir, *key))
    return res


def collect(args: argparse.Namespace, settings: list[str], seeds: list[int],
            partial: Path) -> list[dict]:
    """Every (setting, seed, strategy): recorded in ``partial``, else run (unless report-only)."""
    workdir = Path(args.workdir)
    done = load_partial(partial, lambda r: (r["setting"], r["strategy"], r["seed"]))
    results: list[dict] = []
    for setting in settings:
        for seed in seeds:
            for strategy in args.strategies.split(","):
                key = (setting, strategy, seed)
                if key in done:
                    results.append(_recorded(done, workdir, key))
                    continue
                if args.report_only:
                    continue
                res = run_recorded(partial, f"{setting}/{strategy}/seed {seed}", run_one,
                                   setting, strategy, seed, args.overrides, workdir)
                if res is None:
                    continue
                results.append(res)
                print(f"{setting:>16} {strategy:>13} seed {seed}: acc {res['mean']:.3f} "
                      f"worst10 {res['worst10']:.3f} final {res['final_mean']:.3f} "
                      f"({res['wall']:.0f}s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the benchmark and write its report."""
    args = parse_args(argv)
    settings = args.settings.split(",") if args.settings else (QUICK if args.quick else FULL)
    seeds = parse_seeds(args.seeds, args.quick)
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r} (known: {', '.join(sorted(SETTINGS))})")
    name = "accuracy_quick.md" if args.quick else "accuracy.md"
    out = Path(args.out or ROOT / "benchmarks" / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.jsonl")
    results = collect(args, settings, seeds, partial)
    ran = [s for s in settings if any(r["setting"] == s for r in results)]
    preamble = args.preamble.read_text() if args.preamble else ""
    print(write_report(results, ran, out, command_line("accuracy.py", argv), seeds, preamble))
    if not args.report_only:
        partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
