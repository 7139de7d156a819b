"""The command line of ``benchmarks/performance.py``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from benchmarks.perf.common import DEFAULT_FLOWER_PYTHON, DEFAULT_OUT, SECTIONS

DESCRIPTION = "Performance and scale benchmark of fedbip-ray."
FULL_AGG_CASES = "125x1e6,250x1e6,500x1e6,1000x2.5e5,1000x1e6"
QUICK_AGG_CASES = "8x2e4,32x2e4"


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _csv_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _cases(text: str) -> list[tuple[int, int]]:
    """``"125x1e6,1000x2.5e5"`` -> [(125, 1000000), (1000, 250000)]."""
    out = []
    for item in _csv(text):
        n, _, d = item.lower().partition("x")
        out.append((int(float(n)), int(float(d))))
    return out


def _run_args(p: argparse.ArgumentParser) -> None:
    """What to run and where to write it."""
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (smoke run: minutes, not timings)")
    p.add_argument("--sections", type=_csv, default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown report (default {DEFAULT_OUT}; none with --quick)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                   help="CPUs of the machine (floor workers)")
    p.add_argument("--inprocess", action="store_true",
                   help="run fedbip federations inside this process (joins an initialized Ray; "
                        "CI); whole-run times are then not measured")
    p.add_argument("--rounds", type=int, default=None,
                   help="override the rounds of the overhead/Flower presets")


def _section_args(p: argparse.ArgumentParser) -> None:
    """The sizes and variants of each section."""
    p.add_argument("--overhead-models", type=_csv, default=None,
                   help="default tiny-bert,minilm (quick: tiny-bert)")
    p.add_argument("--flower-models", type=_csv, default=None,
                   help="default minilm,smollm2 (quick: tiny-bert,tiny-llama)")
    p.add_argument("--flower-variants", type=_csv, default=["reload", "cached", "reload-gguf"],
                   help="reload,cached,reload-gguf (reload-gguf: SmolLM2 only)")
    p.add_argument("--flower-python", default=DEFAULT_FLOWER_PYTHON,
                   help="python of the Flower venv")
    p.add_argument("--pool-n", type=_csv_ints, default=None,
                   help="clients per pool run (default 8,32,128,512; quick 8,32)")
    p.add_argument("--pool-per-round", type=int, default=8, help="clients per round in pool mode")
    p.add_argument("--pool-rounds", type=int, default=None,
                   help="rounds per pool run (default 5; quick 3)")
    p.add_argument("--pool-actors", type=int, default=2, help="client actors in pool mode")
    p.add_argument("--agg-cases", type=_cases, default=None,
                   help=f"NxD cases for aggregation (default {FULL_AGG_CASES}; "
                        f"quick {QUICK_AGG_CASES})")
    p.add_argument("--agg-strategies", type=_csv, default=["fedbip", "fedavg"],
                   help="strategies of the server actor (default fedbip,fedavg)")
    p.add_argument("--agg-force", action="store_true",
                   help="run sizes predicted not to fit in memory")


def parser() -> argparse.ArgumentParser:
    """Every flag of the benchmark (``--run-fedbip``/``--run-floor``: its measured children)."""
    p = argparse.ArgumentParser(description=DESCRIPTION)
    _run_args(p)
    _section_args(p)
    p.add_argument("--reuse", type=Path, default=None,
                   help="a --json file of an earlier run: the sections not selected by --sections "
                        "are reported from it instead of run again (the report names them)")
    p.add_argument("--retries", type=int, default=1,
                   help="re-run a run that failed before its first round (default 1)")
    p.add_argument("--run-fedbip", help=argparse.SUPPRESS)
    p.add_argument("--run-floor", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed flags, with the defaults that depend on ``--quick`` filled in."""
    p = parser()
    args = p.parse_args(argv)
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    q = args.quick
    args.overhead_models = args.overhead_models or (
        ["tiny-bert"] if q else ["tiny-bert", "minilm"])
    args.flower_models = args.flower_models or (
        ["tiny-bert", "tiny-llama"] if q else ["minilm", "smollm2"])
    args.pool_n = args.pool_n or ([8, 32] if q else [8, 32, 128, 512])
    args.pool_rounds = args.pool_rounds or (3 if q else 5)
    args.agg_cases = args.agg_cases or _cases(QUICK_AGG_CASES if q else FULL_AGG_CASES)
    return args
