"""Helpers shared by the accuracy and generative benchmarks: strategy specs, config merging,
the partial-results file, the common command-line flags, report lines and the curve plot."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def merge(a: dict, b: dict) -> dict:
    """Deep merge of two config dicts (``b`` wins)."""
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


def strategy_config(prefix: str, strategy: str, seed: int) -> dict[str, Any]:
    """The per-run part of a benchmark config: run name ``<prefix>-<strategy>-s<seed>``, seed,
    strategy, MLflow off, one CPU per client (``strategy``: a spec for :func:`parse_strategy`)."""
    key, params = parse_strategy(strategy)
    return {"name": f"{prefix}-{key}-s{seed}", "seed": seed,
            "strategy": {"name": key, "params": params},
            "tracking": {"mlflow": False}, "resources": {"num_cpus_per_client": 1}}


def run_dirname(strategy: str, seed: int) -> str:
    """A directory name for one run of a strategy spec (brackets and ';' replaced)."""
    safe = strategy.replace("[", "_").replace("]", "").replace(";", "_")
    return f"{safe}-s{seed}"


def mean_std(values: Sequence[float | None]) -> str:
    """``"mean ± std"`` of the finite values (one value: itself; none: ``n/a``)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def paired(ref: dict[int, float], other: dict[int, float]) -> tuple[float, float, int, int] | None:
    """``ref − other`` over the seeds both ran (finite values only): (mean, std, seeds, seeds
    where ``ref`` is higher); None when no seed is shared."""
    seeds = sorted(s for s in ref.keys() & other.keys()
                   if not (math.isnan(ref[s]) or math.isnan(other[s])))
    if not seeds:
        return None
    d = np.asarray([ref[s] - other[s] for s in seeds])
    return float(d.mean()), float(d.std()), len(seeds), int((d > 0).sum())


def machine_line(seeds: Sequence[int]) -> str:
    """The report's ``Machine:`` line."""
    return (f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
            f"Python {platform.python_version()}; seeds {list(seeds)}.")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that produced a report (``argv`` None: this process's arguments)."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose help is the script's docstring."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_args(ap: argparse.ArgumentParser, strategies: Sequence[str], workdir: str) -> None:
    """The flags both benchmarks share: strategies, seeds, overrides, output and work dir."""
    ap.add_argument("--strategies", default=",".join(strategies),
                    help="comma list; parameters in brackets, e.g. 'fedbip[threshold=0.1;top_k=3]'")
    ap.add_argument("--seeds", default=None, help="comma list (default 0,1,2; --quick 0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override for every run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=workdir)


def parse_seeds(text: str | None, quick: bool) -> list[int]:
    """``--seeds`` as ints (default 0,1,2; quick: 0)."""
    return [int(s) for s in (text or ("0" if quick else "0,1,2")).split(",")]


def load_partial(path: Path, key: Callable[[dict], Hashable]) -> dict[Hashable, dict]:
    """The results an interrupted run recorded in ``path`` (JSON lines), by ``key``."""
    done: dict[Hashable, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[key(r)] = r
    return done


def append_partial(path: Path, result: dict) -> None:
    """Record one finished run in the partial-results file."""
    with path.open("a") as fh:
        fh.write(json.dumps(result) + "\n")


def run_recorded(partial: Path, label: str, run: Callable[..., dict], *args: Any) -> dict | None:
    """``run(*args)``: its result, also appended to the partial-results file; None (and a line
    saying why) when its config is rejected."""
    from fedbip_ray.config import ConfigError

    try:
        res = run(*args)
    except ConfigError as err:
        print(f"{label}: skipped: {err}", flush=True)
        return None
    append_partial(partial, res)
    return res


def preamble_lines(preamble: str) -> list[str]:
    """The preamble's text and a blank line, or nothing when it is blank."""
    return [preamble.strip(), ""] if preamble.strip() else []


def plot_curves(results: Sequence[dict], path: Path, title: str, ylabel: str,
                title_fontsize: float | None = None, integer_rounds: bool = False) -> None:
    """One line per strategy: the mean over runs of ``curve`` ([(round, value)]) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        curves = [dict(r["curve"]) for r in results if r["strategy"] == strategy]
        rounds = sorted(set.intersection(*[set(c) for c in curves]))
        ax.plot(rounds, [np.mean([c[x] for c in curves]) for x in rounds], marker="o", ms=3,
                label=strategy)
    ax.set_title(title, **({"fontsize": title_fontsize} if title_fontsize else {}))
    if integer_rounds:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
