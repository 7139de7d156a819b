"""GPU benchmark: the quickstart and instruct configs, briefly, with 1, 2 and 4 client actors
per GPU.

    python benchmarks/gpu.py [--budget-s 480] [--out benchmarks/results/gpu.md]

Each case is a ``fedbip run`` subprocess (embedded local Ray, MLflow off) with ``--set`` overrides:
few rounds, few clients, ``train.max_steps_per_round`` small; ``resources.num_gpus_per_client``
1, 0.5 and 0.25 (``resources.device=cuda``) and the same on CPU (``resources.device=cpu``) for the
ratio. From each run's ``metrics.jsonl`` / ``summary.json``: seconds per round, samples per second
per client (batch size / ``extra.train_step_seconds``); GPU memory per actor from the actors'
torch.cuda figures when the rows carry them, else from ``nvidia-smi`` sampled during the run; the
device each actor used (the processes ``nvidia-smi`` saw on the GPU). Cases that would not finish
inside the budget are skipped and marked so. Without a CUDA GPU torch can use, the results file
says that no GPU was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "gpu.md"
PACKINGS = (1, 2, 4)  # client actors per GPU
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("jobs/configs/quickstart.yaml",
                   ["data.num_clients=4", "data.examples_per_client=64", "train.batch_size=16"]),
    "instruct": ("jobs/configs/instruct.yaml",
                 ["data.num_clients=6", "data.examples_per_client=24", "train.batch_size=8",
                  "train.eval_batch_size=16"]),
}
COMMON = ["federation.rounds=2", "train.local_epochs=1", "train.max_steps_per_round=4",
          "tracking.mlflow=false", "resources.num_cpus_per_client=1"]


@dataclass(frozen=True)
class Case:
    """One run: a config at a packing (actors per GPU; 0 = CPU with that many actors)."""

    config: str
    per_gpu: int
    actors: int

    @property
    def label(self) -> str:
        return f"{self.actors} actor(s) per GPU" if self.per_gpu else f"CPU, {self.actors} actor(s)"

    def overrides(self) -> list[str]:
        base = [*COMMON, *CONFIGS[self.config][1], f"resources.max_actors={self.actors}"]
        if self.per_gpu:
            return [*base, f"resources.num_gpus_per_client={1 / self.per_gpu:g}",
                    "resources.device=cuda"]
        return [*base, "resources.num_gpus_per_client=0", "resources.device=cpu"]


@dataclass
class Result:
    case: Case
    ok: bool = False
    note: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    gpu_mib: dict[int, float] = field(default_factory=dict)  # pid -> peak MiB (nvidia-smi)


# ------------------------------------------------------------------------------ the machine
def run_quiet(cmd: list[str], timeout: float = 30) -> str | None:
    """stdout of ``cmd``, or None when it fails or is missing."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gpu_names() -> list[str]:
    """GPUs ``nvidia-smi`` lists (empty without a driver)."""
    out = run_quiet(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    return [line.strip() for line in (out or "").splitlines() if line.strip()]


def torch_cuda() -> str | None:
    """``torch <version>, CUDA <version>`` when the run's torch can use a GPU, else None."""
    code = ("import torch; print(torch.__version__, torch.version.cuda) "
            "if torch.cuda.is_available() else print('')")
    out = (run_quiet([sys.executable, "-c", code], timeout=120) or "").strip()
    return f"torch {out.split()[0]}, CUDA {out.split()[1]}" if out else None


class GpuSampler:
    """Peak GPU memory of each process on the GPUs, from ``nvidia-smi`` once a second."""

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            out = run_quiet(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                             "--format=csv,noheader,nounits"], timeout=10) or ""
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0].isdigit() and parts[1].replace(".", "").isdigit():
                    pid, mib = int(parts[0]), float(parts[1])
                    self.peak[pid] = max(self.peak.get(pid, 0.0), mib)
            self._stop.wait(1.0)


# ------------------------------------------------------------------------------------ runs
def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def run_case(case: Case, workdir: Path, timeout_s: float) -> Result:
    """``fedbip run`` of one case; its rows, summary and GPU memory."""
    out = workdir / f"{case.config}-{case.per_gpu}-{case.actors}"
    argv = ["run", CONFIGS[case.config][0], "--output", str(out)]
    for item in case.overrides():
        argv += ["--set", item]
    code = f"import sys; from fedbip_ray.cli import main; sys.exit(main({argv!r}))"
    res = Result(case)
    with GpuSampler() as sampler:
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(),
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            res.note = f"stopped after {timeout_s:.0f} s (budget)"
            return res
    res.gpu_mib = dict(sampler.peak)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        res.note = f"exit {proc.returncode}: {tail[:200]}"
        return res
    res.rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if line]
    res.summary = json.loads((out / "summary.json").read_text())
    res.ok = True
    return res


def plan_cases(configs: list[str]) -> list[Case]:
    cases = []
    for name in configs:
        cases += [Case(name, k, k) for k in PACKINGS]
        cases += [Case(name, 0, 1), Case(name, 0, 4)]
    return cases


def run_all(cases: list[Case], budget_s: float, echo=print) -> list[Result]:
    """Run ``cases`` in order inside ``budget_s`` seconds in all (the rest are skipped)."""
    start, results = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="fbgpu") as tmp:
        for case in cases:
            left = budget_s - (time.monotonic() - start)
            if left < 30:
                results.append(Result(case, note="skipped: time budget spent"))
                continue
            t0 = time.monotonic()
            res = run_case(case, Path(tmp), left)
            echo(f"{case.config} / {case.label}: {'ok' if res.ok else res.note} "
                 f"({time.monotonic() - t0:.0f} s)")
            results.append(res)
    return results


# ---------------------------------------------------------------------------------- report
def _override(case: Case, key: str) -> float:
    return float(next(o.split("=", 1)[1] for o in case.overrides() if o.startswith(f"{key}=")))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def samples_per_s(res: Result) -> float | None:
    """Per client: batch size / mean seconds per train step."""
    steps = [r["extra"]["train_step_seconds"] for r in res.rows
             if (r.get("extra") or {}).get("train_step_seconds")]
    mean = _mean(steps)
    return None if not mean else _override(res.case, "train.batch_size") / mean


def gpu_memory(res: Result) -> tuple[str, str]:
    """(MiB per actor, device column) from the rows' torch.cuda figures or nvidia-smi."""
    if not res.case.per_gpu:
        return "–", f"cpu ({res.case.actors} actor(s))"
    keys = {k for r in res.rows for k in (r.get("extra") or {}) if "cuda" in k or "gpu" in k}
    if keys:
        key = sorted(keys)[0]
        peak = max(float(r["extra"][key]) for r in res.rows if key in r.get("extra", {}))
        mem = f"{peak:.0f} ({key})"
    else:
        vals = list(res.gpu_mib.values())
        mem = f"{_mean(vals):.0f} mean, {max(vals):.0f} max (nvidia-smi)" if vals else "none seen"
    if not res.gpu_mib:  # e.g. nvidia-smi in a container sees no processes
        return mem, "cuda (resources.device=cuda; nvidia-smi listed no process)"
    return mem, f"cuda: {len(res.gpu_mib)} of {res.case.actors} actor process(es) on the GPU"


def table(results: list[Result], config: str) -> list[str]:
    """The markdown table of one config's cases."""
    mine = [r for r in results if r.case.config == config]
    cpu1 = next((samples_per_s(r) for r in mine
                 if r.ok and r.case.per_gpu == 0 and r.case.actors == 1), None)
    lines = [f"### {config} (`{CONFIGS[config][0]}`)", "",
             "| case | s/round (r1 / rest) | samples/s per client | vs CPU 1 actor "
             "| GPU MiB per actor "
             "| device | mean accuracy | wall s |", "|---|---|---|---|---|---|---|---|"]
    for res in mine:
        if not res.ok:
            lines.append(f"| {res.case.label} | {res.note} | | | | | | |")
            continue
        secs = [float(r["seconds"]) for r in res.rows]
        sps = samples_per_s(res)
        ratio = f"{sps / cpu1:.1f}x" if sps and cpu1 else "–"
        mem, device = gpu_memory(res)
        lines.append(f"| {res.case.label} | {_fmt(secs[0] if secs else None)} "
                     f"/ {_fmt(_mean(secs[1:]))} "
                     f"| {_fmt(sps)} | {ratio} | {mem} | {device} "
                     f"| {_fmt(res.summary.get('mean_accuracy'), '.3f')} "
                     f"| {_fmt(res.summary.get('wall_seconds'), '.0f')} |")
    return [*lines, ""]


def header(command: str) -> list[str]:
    return ["# GPU benchmark", "", f"Command: `{command}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}.", ""]


def report(results: list[Result], gpus: list[str], cuda: str, command: str) -> str:
    lines = header(command) + [
        f"GPU: {'; '.join(gpus)} ({cuda}).", "",
        f"Each case: `fedbip run CONFIG` with `--set` "
        f"{', '.join(f'`{o}`' for o in COMMON)}, plus the "
        "per-config overrides below and `resources.max_actors` = the actor count; GPU cases set "
        "`resources.num_gpus_per_client` = 1 / actors per GPU and `resources.device=cuda`, "
        "CPU cases "
        "`resources.device=cpu`. Samples/s per client = batch size / mean "
        "`extra.train_step_seconds`; "
        "s/round from `metrics.jsonl` `seconds` (round 1 includes the warm-up).", ""]
    for name in dict.fromkeys(r.case.config for r in results):
        lines += [f"Overrides for {name}: {', '.join(f'`{o}`' for o in CONFIGS[name][1])}", ""]
        lines += table(results, name)
    return "\n".join(lines)


def no_gpu_report(gpus: list[str], command: str) -> str:
    why = ("nvidia-smi lists " + "; ".join(gpus) + " but this environment's torch cannot use it "
           "(a CPU build of torch, or no CUDA driver)") if gpus else "nvidia-smi lists no GPU"
    return "\n".join(header(command) + [
        f"**No GPU was measured**: {why}. Run `python benchmarks/gpu.py` on a machine with a CUDA "
        "GPU and a CUDA build of torch (about 8 minutes) to fill this file with seconds per round, "
        "samples per second per client, GPU memory per actor and the device each actor used, for "
        "1, 2 and 4 client actors per GPU and on CPU, for the quickstart and instruct "
        "configs.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="all runs together (s)")
    parser.add_argument("--configs", default="quickstart,instruct", help="comma-separated")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    command = "python benchmarks/gpu.py" + (f" {' '.join(argv)}" if argv else "")
    gpus, cuda = gpu_names(), torch_cuda()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not gpus or cuda is None:
        args.out.write_text(no_gpu_report(gpus, command))
        print(f"no GPU measured; wrote {args.out}")
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"gpu.py: error: unknown config(s) {unknown}; known: {sorted(CONFIGS)}",
              file=sys.stderr)
        return 2
    results = run_all(plan_cases(configs), args.budget_s)
    args.out.write_text(report(results, gpus, cuda, command))
    print(f"wrote {args.out}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
