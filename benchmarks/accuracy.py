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
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedbip_ray.config import ConfigError, config_from_dict  # noqa: E402

STRATEGIES = ["local", "fedavg", "fedavg-ft", "fedprox", "fedamp", "fedbip-paper", "fedbip",
              "fedbip-layer", "oracle"]

_NLP = {
    "model": {"name": "minilm", "max_length": 48, "peft": {"r": 8, "alpha": 16, "dropout": 0.05}},
    "data": {"dataset": "rotten-tomatoes", "num_clients": 6, "examples_per_client": 200},
    "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.002},
    "federation": {"rounds": 5},
}
_CV = {
    "model": {"name": "efficientnet-lite0", "task": "image-classification"},
    "data": {"dataset": "fashion-mnist", "num_clients": 8, "examples_per_client": 150},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.003},
    "federation": {"rounds": 5},
}
_TINY = {
    "model": {"name": "tiny-bert", "max_length": 24, "peft": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "data": {"dataset": "synthetic-text", "num_clients": 6, "examples_per_client": 60},
    "train": {"local_epochs": 3, "batch_size": 16, "lr": 0.02},
    "federation": {"rounds": 4},
}
_TINY_CV = {
    "model": {"name": "tiny-cnn", "task": "image-classification"},
    "data": {"dataset": "digits", "num_clients": 6, "examples_per_client": 100},
    "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.01},
    "federation": {"rounds": 4},
}

SETTINGS: dict[str, tuple[dict, dict]] = {
    "nlp-conflict": (_NLP, {"data": {"partition": {"kind": "groups", "num_groups": 2, "shift": "label-flip"}}}),
    "nlp-dirichlet": (_NLP, {"data": {"partition": {"kind": "dirichlet", "alpha": 0.1}}}),
    "cv-rotation": (_CV, {"data": {"partition": {"kind": "groups", "num_groups": 4, "shift": "rotation"}}}),
    "cv-dirichlet": (_CV, {"data": {"partition": {"kind": "dirichlet", "alpha": 0.1}}}),
    "tiny-conflict": (_TINY, {"data": {"partition": {"kind": "groups", "num_groups": 2, "shift": "label-flip"}}}),
    "tiny-dirichlet": (_TINY, {"data": {"partition": {"kind": "dirichlet", "alpha": 0.1}}}),
    "tiny-cv-rotation": (_TINY_CV, {"data": {"partition": {"kind": "groups", "num_groups": 2, "shift": "rotation"}}}),
}
FULL = ["nlp-conflict", "nlp-dirichlet", "cv-rotation", "cv-dirichlet"]
QUICK = ["tiny-conflict", "tiny-dirichlet"]


def merge(a: dict, b: dict) -> dict:
    """Deep merge of two config dicts (b wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fedbip[threshold=0.1;top_k=3]"`` -> ("fedbip", {"threshold": 0.1, "top_k": 3})."""
    import yaml

    if "[" not in spec:
        return spec, {}
    name, rest = spec.split("[", 1)
    if not rest.endswith("]"):
        raise ValueError(f"strategy spec {spec!r}: missing closing ']'")
    params = {}
    for item in rest[:-1].split(";"):
        if item.strip():
            k, v = item.split("=", 1)
            params[k.strip()] = yaml.safe_load(v)
    return name, params


def setting_config(setting: str, strategy: str, seed: int, overrides: list[str]) -> Any:
    base, extra = SETTINGS[setting]
    name, params = parse_strategy(strategy)
    data = merge(merge(base, extra), {
        "name": f"{setting}-{name}-s{seed}", "seed": seed,
        "strategy": {"name": name, "params": params}, "tracking": {"mlflow": False},
        "resources": {"num_cpus_per_client": 1},
    })
    return config_from_dict(data, overrides)


def select(history: list[dict]) -> dict[str, Any]:
    """Scores of one run: test accuracy at the best-validation round, and at the last round."""
    rows = [r for r in history if r.get("mean_accuracy") is not None]
    best = max(rows, key=lambda r: (r["mean_val_accuracy"] if r["mean_val_accuracy"] is not None else -1))
    final = rows[-1]
    target = 0.95 * final["mean_accuracy"]
    to95 = next(r["round"] for r in rows if r["mean_accuracy"] >= target)
    return {
        "selected_round": best["round"], "mean": best["mean_accuracy"], "worst10": best["worst10_accuracy"],
        "val": best["mean_val_accuracy"],
        "final_mean": final["mean_accuracy"], "final_worst10": final["worst10_accuracy"],
        "rounds_to_95": to95, "curve": [(r["round"], r["mean_accuracy"]) for r in rows],
    }


def run_dir(workdir: Path, setting: str, strategy: str, seed: int) -> Path:
    safe = strategy.replace("[", "_").replace("]", "").replace(";", "_")
    return workdir / setting / f"{safe}-s{seed}"


def group_stats(out: Path) -> dict[str, float]:
    """In-group weight share and ARI of the last aggregation, when the clients have groups."""
    from fedbip_ray.core.similarity import group_recovery

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


def val_stats(out: Path) -> dict[str, float]:
    """Mean validation accuracy at the selected (best-validation) round, from metrics.jsonl."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {"val": select([json.loads(x) for x in path.read_text().splitlines()])["val"]}


def run_one(setting: str, strategy: str, seed: int, overrides: list[str], workdir: Path) -> dict[str, Any]:
    from fedbip_ray.runtime.federation import run_federation

    cfg = setting_config(setting, strategy, seed, overrides)
    out = run_dir(workdir, setting, strategy, seed)
    t0 = time.perf_counter()
    run_federation(cfg, out, echo=lambda s: None)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    res = select(history)
    res.update(setting=setting, strategy=strategy, seed=seed, wall=time.perf_counter() - t0)
    res.update(group_stats(out))
    return res


def _ms(values: list[float]) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(results: list[dict], setting: str) -> list[str]:
    lines = [f"### {setting}", "",
             "| strategy | seeds | mean acc (val-selected) | worst-10% | final-round mean | mean val acc "
             "(selected round) | rounds to 95% | wall s | in-group weight share | ARI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for strategy in dict.fromkeys(r["strategy"] for r in results if r["setting"] == setting):
        rs = [r for r in results if r["setting"] == setting and r["strategy"] == strategy]
        lines.append(
            f"| {strategy} | {len(rs)} | {_ms([r['mean'] for r in rs])} | {_ms([r['worst10'] for r in rs])} | "
            f"{_ms([r['final_mean'] for r in rs])} | {_ms([r.get('val') for r in rs])} | "
            f"{np.mean([r['rounds_to_95'] for r in rs]):.1f} | "
            f"{np.mean([r['wall'] for r in rs]):.0f} | {_ms([r.get('group_share') for r in rs])} | "
            f"{_ms([r.get('ari') for r in rs])} |")
    lines.append("")
    return lines


BASELINES = ["local", "fedavg", "fedavg-ft", "fedprox", "fedamp", "fedbip-paper"]


def _mean_of(results: list[dict], setting: str, strategy: str, key: str) -> float | None:
    v = [r[key] for r in results if r["setting"] == setting and r["strategy"] == strategy
         and r.get(key) is not None]
    return float(np.mean(v)) if v else None


def goal_lines(results: list[dict], settings: list[str], method: str = "fedbip") -> list[str]:
    """The goals checked against the measured means (over seeds) of ``method``."""
    lines = [f"### Goals ({method}, means over seeds)", "",
             "| setting | " + method + " | best baseline (not oracle) | vs best baseline | vs oracle "
             "| vs fedavg | vs local | worst-10% vs local | rounds to 95%: " + method + " / fedavg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for st in settings:
        m = _mean_of(results, st, method, "mean")
        if m is None:
            continue
        base = {b: _mean_of(results, st, b, "mean") for b in BASELINES}
        base = {k: v for k, v in base.items() if v is not None}
        best = max(base, key=base.get) if base else None
        oracle = _mean_of(results, st, "oracle", "mean")
        fa, lo = base.get("fedavg"), base.get("local")
        w, wl = _mean_of(results, st, method, "worst10"), _mean_of(results, st, "local", "worst10")
        r95, r95a = _mean_of(results, st, method, "rounds_to_95"), _mean_of(results, st, "fedavg", "rounds_to_95")

        def diff(x: float | None, m: float = m) -> str:
            return "n/a" if x is None else f"{m - x:+.3f}"

        lines.append(
            f"| {st} | {m:.3f} | {best or 'n/a'} {base.get(best, float('nan')):.3f} | {diff(base.get(best))} "
            f"| {diff(oracle)} | {diff(fa)} | {diff(lo)} | "
            f"{'n/a' if w is None or wl is None else f'{w - wl:+.3f}'} | "
            f"{'n/a' if r95 is None or not r95a else f'{r95:.1f} / {r95a:.1f}'} |")
    lines.append("")
    return lines


def plot(results: list[dict], setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in results if r["setting"] == setting):
        curves = [dict(r["curve"]) for r in results if r["setting"] == setting and r["strategy"] == strategy]
        rounds = sorted(set.intersection(*[set(c) for c in curves]))
        ax.plot(rounds, [np.mean([c[x] for c in curves]) for x in rounds], marker="o", ms=3, label=strategy)
    ax.set_title(f"{setting}: mean client test accuracy per round")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[dict], settings: list[str], out: Path, command: str, seeds: list[int],
                 preamble: str = "") -> str:
    lines = ["# Accuracy benchmark", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}; "
             f"seeds {seeds}.", "", *([preamble.strip(), ""] if preamble.strip() else []),
             "Mean client accuracy = mean over clients of each client's accuracy on its own test split, at the "
             "round with the best mean validation accuracy (mean ± std over seeds). Worst-10% = mean of the "
             "lowest 10% of clients (at least one). Rounds to 95% = first round reaching 95% of the final "
             "round's mean accuracy.", ""]
    lines += goal_lines(results, settings)
    for s in settings:
        lines += table(results, s)
        png = out.with_name(f"{out.stem}_{s}.png")
        plot(results, s, png)
        lines += [f"![{s}]({png.name})", ""]
    text = "\n".join(lines)
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"settings {QUICK}, 1 seed")
    ap.add_argument("--settings", help=f"comma list from {sorted(SETTINGS)}")
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma list; parameters in brackets, e.g. 'fedbip[threshold=0.1;top_k=3]'")
    ap.add_argument("--seeds", default=None, help="comma list (default 0,1,2; --quick 0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default="/tmp/fedbip_accuracy")
    ap.add_argument("--preamble", type=Path, default=None,
                    help="markdown file inserted after the report's header (reading notes)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the results recorded so far (an interrupted run's "
                         "partial file) without running anything")
    args = ap.parse_args(argv)
    settings = args.settings.split(",") if args.settings else (QUICK if args.quick else FULL)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    strategies = args.strategies.split(",")
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r} (known: {', '.join(sorted(SETTINGS))})")
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("accuracy_quick.md" if args.quick else "accuracy.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: list[dict] = []
    partial = out.with_suffix(".partial.jsonl")
    done = {}
    if partial.is_file():  # resume an interrupted benchmark
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["setting"], r["strategy"], r["seed"])] = r
    for setting in settings:
        for seed in seeds:
            for strategy in strategies:
                key = (setting, strategy, seed)
                if key in done:
                    if "group_share" not in done[key]:
                        done[key].update(group_stats(run_dir(Path(args.workdir), setting, strategy, seed)))
                    if done[key].get("val") is None:
                        done[key].update(val_stats(run_dir(Path(args.workdir), setting, strategy, seed)))
                    results.append(done[key])
                    continue
                if args.report_only:
                    continue
                try:
                    res = run_one(setting, strategy, seed, args.overrides, Path(args.workdir))
                except ConfigError as err:
                    print(f"{setting}/{strategy}/seed {seed}: skipped: {err}", flush=True)
                    continue
                results.append(res)
                with partial.open("a") as fh:
                    fh.write(json.dumps(res) + "\n")
                print(f"{setting:>16} {strategy:>13} seed {seed}: acc {res['mean']:.3f} "
                      f"worst10 {res['worst10']:.3f} final {res['final_mean']:.3f} ({res['wall']:.0f}s)", flush=True)
    ran = [s for s in settings if any(r["setting"] == s for r in results)]
    preamble = args.preamble.read_text() if args.preamble else ""
    print(write_report(results, ran, out, command, seeds, preamble))
    if not args.report_only:
        partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
