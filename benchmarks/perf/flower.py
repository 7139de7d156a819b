"""Flower 1.42 side by side: the same federation under Flower's simulation engine (its own
venv), and section 2 of the report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.perf.common import FLOWER_DIR, REPO, Run, child_env, fail_run, log_tail, write_json
from benchmarks.perf.fmt import describe, fmt_goal, fmt_num, peak_lines, run_table
from benchmarks.perf.measure import round_times, run_measured, top_processes

FLOWER_FIGURES = ("loads", "load_seconds", "compute_seconds", "server_init_seconds",
                  "torch_threads", "flwr", "ray")


def flower_run(workload: str, variant: str, cfg_dict: dict[str, Any], shards: list[str],
               num_labels: int, work: Path, cpus: int, python: str) -> Run:
    """The same federation under Flower's simulation engine (its own venv)."""
    runner = f"flower-{variant}"
    if not Path(python).is_file():
        return fail_run(runner, workload, f"Flower venv python {python} not found "
                        "(bash benchmarks/flower_baseline/setup_venv.sh)")
    result = work / f"{runner}-result.json"
    result.unlink(missing_ok=True)
    n = int(cfg_dict["data"]["num_clients"])
    job = write_json(work / f"{runner}-job.json", {
        "config": cfg_dict, "shards": shards, "num_labels": num_labels, "num_clients": n,
        "rounds": int(cfg_dict["federation"]["rounds"]), "variant": variant, "cpus": cpus,
        "client_num_cpus": float(cfg_dict["resources"]["num_cpus_per_client"]),
        "result": str(result)})
    log = work / f"{runner}.log"
    cmd = [python, str(FLOWER_DIR / "run.py"), str(job)]
    rc, wall, sampler = run_measured(cmd, child_env([REPO / "benchmarks"]), log)
    if rc != 0 or not result.is_file():
        return fail_run(runner, workload, f"exit {rc}: {log_tail(log)}", wall)
    res = json.loads(result.read_text())
    if sum(res.get("failures") or []):
        return fail_run(runner, workload,
                        f"{sum(res['failures'])} client failures: {log_tail(log)}", wall)
    return Run(runner, workload, round_times(res["start"], res["ends"]), wall, sampler.peak,
               sampler.peak_procs, res.get("accuracy"),
               extra={**{k: res.get(k) for k in FLOWER_FIGURES},
                      "peak_top": top_processes(sampler.peak_top)})


def flower_runners(model: str, variants: Sequence[str]) -> list[str]:
    """The Flower runners of ``model`` (``reload-gguf`` exists for the GGUF-packaged SmolLM2
    only)."""
    return [f"flower-{v}" for v in variants if v != "reload-gguf" or model == "smollm2"]


INTRO = (
    "Flower runs in its own venv (flwr[simulation]==1.42.0 pins ray==2.55.1; fedbip uses "
    "ray 2.60.0): `benchmarks/flower_baseline/` (ServerApp + ClientApp, `run_simulation`, "
    "`FedAvg` from `flwr.serverapp.strategy`, `client_resources={num_cpus: 1}`). Its "
    "ClientApp calls the same trainer class (`fedbip_ray.training.registry.make_trainer`; "
    "no Ray inside) on the same Parquet shards, with the same seeds, so the computation per "
    "client is identical. Messages carry only the adapter state (D floats), as fedbip does. "
    "Variants: **flower-reload** builds the model for every message, as Flower's Hugging "
    "Face app template does (`flwr new`, `client.huggingface.py.tpl`: the model is loaded "
    "in `client_fn`); **flower-cached** keeps one model per Ray worker process in a "
    "module-level cache (the workaround of Flower's FlowerTune LLM template); "
    "**flower-reload-gguf** (SmolLM2 only) builds the model for every message from the "
    "packaged GGUF file, as `from_pretrained(dir, gguf_file=...)` in `client_fn` does, "
    "without fedbip's one-time conversion cache (each build also writes the converted copy "
    "into a fresh temporary directory and loads it from there). All cache the tokenized "
    "data per process. Whole run = process launch to exit (imports, Ray start, model loads, "
    "rounds, shutdown); fedbip's also includes writing the shards (the Flower and floor "
    "runs read pre-written ones)."
)


def _vs_line(model: str, fed: Run, fl: Run) -> str:
    """fedbip against one Flower variant: the goals, and how often Flower built the model."""
    loads = fl.extra.get("loads") or []
    secs = fl.extra.get("load_seconds") or []
    smollm2 = (f"; SmolLM2 round goal {fmt_goal(fed.steady / fl.steady, 0.5)}"
               if model == "smollm2" else "")
    compute = " / ".join(f"{x:.1f}" for x in fl.extra.get("compute_seconds") or [])
    return (f"- vs {fl.runner}: steady round {fmt_goal(fed.steady / fl.steady, 1.0)}{smollm2}"
            f"; whole run {fmt_goal(fed.whole / fl.whole, 0.9)}; peak memory "
            f"{fmt_goal(fed.peak_pss / fl.peak_pss, 0.7)}. {fl.runner}'s clients built the "
            f"model {' / '.join(str(x) for x in loads) or 0} times in rounds "
            f"{'/'.join(str(i + 1) for i in range(len(loads)))} "
            f"({' / '.join(f'{x:.1f}' for x in secs) or 0} s, summed over its workers; "
            f"training and evaluation inside the ClientApp took {compute} s) "
            "plus once in the ServerApp for the initial arrays "
            f"({fmt_num(fl.extra.get('server_init_seconds'))} s); torch threads in its "
            f"workers: {sorted(set(fl.extra.get('torch_threads') or []))}.")


def _notes(fed: Run, flowers: Sequence[Run]) -> list[str]:
    """What building the model per message cost, and what fedbip's whole run includes."""
    out = []
    by = {fl.runner: fl for fl in flowers if not fl.error}
    for name in ("flower-reload", "flower-reload-gguf"):
        if name in by and "flower-cached" in by:
            out.append(f"- Cost of building the model per message: {name}'s steady round is "
                       f"{by[name].steady - by['flower-cached'].steady:+.2f} s longer than "
                       "flower-cached's.")
    wl = fed.extra.get("workload") or {}
    if wl.get("shard_seconds") is not None and not fed.error:
        out.append("- fedbip's whole run includes building the shards: "
                   f"{wl['shard_seconds']:.1f} s when measured on its own. Round 1 of Flower "
                   "includes its workers' first imports (torch, transformers), which fedbip's "
                   "actors do before round 1.")
    return out


def flower_section(cache: dict[tuple[str, str], Run], models: Sequence[str],
                   variants: Sequence[str]) -> list[str]:
    """Section 2: per model, fedbip and every Flower variant side by side."""
    out = ["## 2. Side by side with Flower 1.42 (simulation engine)", "", INTRO, ""]
    for model in models:
        fed = cache.get((model, "fedbip"))
        flowers = [cache[(model, f"flower-{v}")] for v in variants
                   if (model, f"flower-{v}") in cache]
        if fed is None or not flowers:
            continue
        cfg = fed.extra.get("workload", {}).get("config")
        primary = flowers[0]
        out += [f"### {model}", "", f"Work: {describe(cfg)}." if cfg else "", ""]
        out += run_table([fed, *flowers], primary if not primary.error else None, primary.runner)
        out += ["", *peak_lines([fed, *flowers]), ""]
        out += [_vs_line(model, fed, fl) for fl in flowers if not (fl.error or fed.error)]
        out += _notes(fed, flowers)
        out.append("")
    return out
