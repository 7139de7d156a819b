"""Paths, the measured processes' environment, the result of one run and the small plumbing
shared by every section."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent.parent
ENTRY = REPO / "benchmarks" / "performance.py"
FLOWER_DIR = REPO / "benchmarks" / "flower_baseline"
DEFAULT_OUT = Path("benchmarks/results/performance.md")
DEFAULT_FLOWER_PYTHON = os.environ.get("FEDBIP_FLOWER_PYTHON", "/work/flower-venv/bin/python")
SECTIONS = ("overhead", "flower", "pool", "aggregation", "bytes")
GIB = 1024**3
MIB = 1024**2
RUN_TIMEOUT_S = 3 * 3600

# Environment of every measured process: quiet, offline, loopback-only Ray, no telemetry.
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


@dataclass
class Run:
    """One measured run of one runner on one workload."""

    runner: str  # "floor" | "fedbip" | "flower-reload" | "flower-cached"
    workload: str  # model preset or "pool-N"
    rounds: list[float]  # wall seconds of each round
    whole: float  # seconds from process launch to exit (NaN when run in-process)
    peak_pss: float  # bytes, all processes of the run
    peak_procs: int
    accuracy: float | None  # mean over clients of the last round's test accuracy
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def steady(self) -> float:
        """Mean round time over rounds >= 2 (round 1 alone if there is only one)."""
        r = self.rounds[1:] if len(self.rounds) > 1 else self.rounds
        return float(np.mean(r)) if r else math.nan

    @property
    def startup(self) -> float:
        """Whole-run time not spent in rounds (start-up, model loading, shutdown)."""
        return self.whole - float(sum(self.rounds)) if self.rounds else math.nan


def fail_run(runner: str, workload: str, error: str, whole: float = math.nan) -> Run:
    """A run that failed with ``error`` (no rounds, no figures)."""
    return Run(runner, workload, [], whole, math.nan, 0, None, error=error)


def child_env(extra_paths: Sequence[Path] = ()) -> dict[str, str]:
    """Environment for a measured child: ours on top of the current one, no RAY_ADDRESS (every
    run starts its own local Ray), the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CHILD_ENV)
    paths = [str(p) for p in (REPO, *extra_paths)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def log_tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log, without colour codes or warnings, on one line."""
    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
    except OSError:
        return ""
    keep = [ln.strip() for ln in text.splitlines()
            if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    return " | ".join(keep[-lines:])[-600:]


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def digest(paths: Iterable[str | Path]) -> str:
    """A short SHA-256 of the files' bytes, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the report)."""
    print(msg, file=sys.stderr, flush=True)


def with_retries(retries: int, run: Callable[..., Run], *args: Any) -> Run:
    """``run(*args)``, repeated up to ``retries`` times while it fails before completing any
    round (e.g. a Ray cluster killed at start-up by someone's ``ray stop``); the first error is
    kept in ``extra["retried_after"]`` and shown in the report."""
    first = run(*args)
    result = first
    for _ in range(retries):
        if not result.error or result.rounds:
            break
        log(f"  retrying after: {result.error[:200]}")
        result = run(*args)
    if result is not first:
        result.extra["retried_after"] = first.error
    return result
