"""Why the fedbip-ray and Flower figures differ, with the measured numbers."""

from __future__ import annotations

import re

import numpy as np

from benchmarks.perf.common import MIB, Run
from benchmarks.perf.fmt import gib

REASONS = [
    "- **Persistent actors vs per-message clients.** fedbip starts one client actor per CPU "
    "(`num_cpus_per_client=1`), each builds the model once and keeps it for the whole run; "
    "a message only carries the client's adapter state (D floats) and the actor loads it "
    "into the resident model (`load_state`, a copy of D values). Flower's simulation engine "
    "keeps its Ray actors too, but calls the ClientApp afresh for every message; an app "
    "written like Flower's templates builds the model inside that call, so the model is "
    "built once per train and once per evaluate message (2 x clients per round). What that "
    "costs depends on the model's build time (measured below): small for MiniLM, large for "
    "SmolLM2-135M (0.5 GB of fp32 weights).",
    "- **Start-up.** Both start a local Ray (fedbip 2.60, Flower 2.55). fedbip's start-up "
    "also builds the shards and loads the model once per actor before round 1; Flower's "
    "ServerApp builds the model once more to obtain the initial arrays.",
    "- **Memory.** Both resident footprints have the same shape: a driver, one model per "
    "client worker, Ray's own processes (GCS, raylet with the object store, dashboard "
    "agent, runtime-env agent, monitor). fedbip adds a server actor (numpy only) that holds "
    "the N x D states; Flower's driver (ServerApp) built one more model for the initial "
    "arrays and keeps torch/transformers loaded. The largest processes at each run's peak "
    "are listed under its table. In flower-reload a worker builds a new model for every "
    "message; whatever the allocator does not hand back to the OS after the previous one is "
    "freed shows up in its PSS.",
    "- **Per round.** fedbip's round adds, on top of the floor: 2 x N Ray calls (fit, "
    "evaluate) and one aggregation call, states and task vectors through the shared-memory "
    "object store, a metrics.jsonl line and an atomic checkpoint of the N x D states. "
    "Flower's round adds its message routing through the in-process LinkState: the "
    "ServerApp's `InMemoryGrid` pushes the messages and polls for replies, the simulation "
    "engine's worker loop pulls them and submits each to a Ray actor, which calls the "
    "ClientApp.",
    "- **Scheduling.** fedbip keeps one call in flight per client actor and runs each "
    "actor's clients longest first by what the client's last call of the phase took; an "
    "actor with nothing left takes the cheapest client queued for the actor with the most "
    "work left (`fedbip_ray/runtime/scheduling.py`). With clients of unequal cost (SmolLM2: "
    "tasks with longer answers take longer to generate), a phase then ends with short calls "
    "on both actors instead of one long call while the other actor idles. Flower's "
    "simulation engine hands each message to the next free actor in the order its ServerApp "
    "sent them. The floor dispatches as fedbip does, so section 1 measures orchestration, "
    "not scheduling.",
    "- **Round 1.** fedbip's actors import torch/transformers and build the model before "
    "round 1 (start-up); Flower's workers do their first imports inside round 1, so compare "
    "steady rounds (rounds >= 2) and whole runs.",
]


def _reload_line(cache: dict[tuple[str, str], Run], model: str, runner: str,
                 rel: Run, fed: Run) -> str | None:
    """What building the model per message cost a ``flower-reload*`` run (None: no builds
    measured in steady rounds)."""
    loads, secs = rel.extra.get("loads") or [], rel.extra.get("load_seconds") or []
    if not (len(loads) > 1 and sum(loads[1:])):
        return None
    per = sum(secs[1:]) / sum(loads[1:])
    line = (f"- Measured on {model}: {runner} built the model "
            f"{sum(loads[1:]) / (len(loads) - 1):.0f} times per steady round, {per:.2f} s "
            f"per build ({sum(secs[1:]) / (len(secs) - 1):.1f} s per round, summed over "
            f"its workers); its steady round was {rel.steady - fed.steady:+.2f} s longer "
            "than fedbip's.")
    cac = cache.get((model, "flower-cached"))
    comp_r = rel.extra.get("compute_seconds") or []
    comp_c = (cac.extra.get("compute_seconds") or []) if cac and not cac.error else []
    if len(comp_r) > 1 and len(comp_c) > 1:
        line += (" Training + evaluation inside the ClientApp (summed over workers, steady "
                 f"rounds): {np.mean(comp_r[1:]):.1f} s per round with a fresh model per "
                 f"message vs {np.mean(comp_c[1:]):.1f} s with a kept one.")
    return line


def _memory_line(model: str, fl: Run, fed: Run) -> str | None:
    """How much of Flower's peak fedbip's client actors alone hold (None: not in the peak)."""
    held = re.search(r"ray::ClientActor(?: x\d+)? (\d+)", fed.extra.get("peak_top") or "")
    if not held:
        return None
    clients = int(held.group(1)) * MIB
    budget = 0.7 * fl.peak_pss
    return (f"- Memory on {model}: at fedbip's peak its client actors alone held "
            f"{gib(clients)} GiB ({clients / fl.peak_pss:.2f}x of flower-cached's whole "
            f"peak, {gib(fl.peak_pss)} GiB): the model and its training and evaluation "
            "working set, the same trainer code in both. 0.7x of Flower's peak is "
            f"{gib(budget)} GiB, which leaves {gib(max(0.0, budget - clients))} GiB for "
            "everything that is not a client actor (the driver, the server actor and "
            f"Ray's processes: {gib(fed.peak_pss - clients)} GiB in fedbip's run).")


def _against_fedbip(cache: dict[tuple[str, str], Run], runners: tuple[str, ...]
                    ) -> list[tuple[str, str, Run, Run]]:
    """(model, runner, run, fedbip's run) for each successful ``runners`` run whose model has a
    successful fedbip run."""
    out = []
    for (model, runner), run in cache.items():
        fed = cache.get((model, "fedbip"))
        if runner in runners and not run.error and fed is not None and not fed.error:
            out.append((model, runner, run, fed))
    return out


def explanations(cache: dict[tuple[str, str], Run]) -> list[str]:
    """Why the figures differ, with the measured numbers where there are some."""
    reloads = [_reload_line(cache, model, runner, rel, fed) for model, runner, rel, fed
               in _against_fedbip(cache, ("flower-reload", "flower-reload-gguf"))]
    memory = [_memory_line(model, fl, fed) for model, _, fl, fed
              in _against_fedbip(cache, ("flower-cached",))]
    measured = [line for line in (*reloads, *memory) if line]
    return ["## Why the numbers differ", "", *REASONS, "", *measured, ""]
