"""The round loop and its preflight: sample clients, fit them on the client actors (deadline),
aggregate on the server actor, run the validation gate, evaluate, write metrics and an atomic
checkpoint.

Faults: a client whose actor dies, raises or misses ``federation.round_deadline_s`` is dropped
from the round (``failed`` / ``stragglers`` in metrics.jsonl); the round aggregates the rest if
at least ``federation.min_report_fraction`` of the participants sent a valid update, else it
keeps every state (``aggregated: false``). Ray restarts a crashed actor (``max_restarts``); one
that is gone for good is replaced. ``--resume`` continues from the latest checkpoint and
reproduces an uninterrupted run (sampling, training and DP noise are seeded per round).

The parts: :mod:`.cluster` (Ray and the actors), :mod:`.dispatch` and :mod:`.phases` (the
per-client calls), :mod:`.rows` (metrics rows, pure), :mod:`.outputs` and :mod:`.checkpoint`
(files), :mod:`.context` (what callbacks see).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from huggingface_hub import constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

from fedbip_ray import storage
from fedbip_ray.config import Config, ConfigError, ModelConfig
from fedbip_ray.config_io import RunFailed
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.data.shards import build_shards, format_summary
from fedbip_ray.models.names import MODEL_ALIASES, resolve_model_path  # torch-free
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime.cluster import (
    heal_actors,
    preflight_ray,
    provision,
    start_actors,
    stop_actors,
)
from fedbip_ray.runtime.context import RunCallback, RunContext
from fedbip_ray.runtime.dispatch import NO_LIVE_ACTOR
from fedbip_ray.runtime.joined import check_growth, with_joined
from fedbip_ray.runtime.messages import AggregationReport, ShardRef
from fedbip_ray.runtime.outputs import RunOutputs
from fedbip_ray.runtime.phases import ala_phase, evaluate_phase, fit_phase, gate_phase
from fedbip_ray.runtime.progress import PhaseProgress
from fedbip_ray.runtime.rows import (
    PhaseClock,
    Row,
    format_round,
    min_reports,
    past_gate_scores,
    round_privacy,
    round_row,
    sample_clients,
    summarize,
)

log = logging.getLogger("fedbip.federation")


# ---------------------------------------------------------------------------------- preflight
def preflight_model(model: ModelConfig) -> None:
    """Driver-side check that ``model.name`` can be found offline, before any actor starts.

    Aliases are checked by the actors (one-line error via ``info``); a directory must hold a
    config.json; any other name must be a valid model id already in the local HF cache.
    """

    name = model.name
    if model.task == "image-classification" or name in MODEL_ALIASES:
        return
    if Path(name).expanduser().exists():
        if model.task == "sequence-classification":
            resolve_model_path(name)  # a directory must hold config.json
        return
    hint = (f"model.name '{name}': not an alias ({', '.join(MODEL_ALIASES)}), an existing "
            "directory, or a model in the local Hugging Face cache (nothing is downloaded)")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(hint) from None
    if not (Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}").is_dir():
        raise ConfigError(hint)


def load_resume_checkpoint(out: RunOutputs, cfg: Config) -> ckpt_io.Checkpoint | None:
    """The latest checkpoint of ``out`` (None: none yet), checked against ``cfg``."""
    ck = ckpt_io.read_latest(out.checkpoints)
    if ck is None:
        return None
    diff = ckpt_io.config_difference(ck.config, cfg.to_dict())
    if diff is not None:
        raise ConfigError(f"--resume {out.location}: config differs from the checkpoint's "
                          f"({diff})")
    check_growth(ck.config.get("data", {}).get("joined", []), cfg.data.joined)
    return ck


def _notify_error(callbacks: Sequence[Any], ctx: RunContext, exc: BaseException) -> None:
    for cb in callbacks:
        handler = getattr(cb, "on_error", None)
        if handler is None:
            continue
        try:
            handler(ctx, exc)
        except Exception:  # noqa: BLE001 - the run's own error matters more
            log.warning("on_error of %s failed", type(cb).__name__, exc_info=True)


def submit_checkpoint(ctx: RunContext, rnd: int) -> None:
    """Ask the server for its state now (round ``rnd``'s: the server serves calls in the order
    they are sent, so the next round cannot change it first); write it in the background."""
    assert ctx.server is not None and ctx.checkpoints is not None
    ref = ctx.server.state_dict.remote()
    sharded = getattr(ctx.server, "fetch_state", None)  # one file per shard
    fetch = (lambda: sharded(ref)) if callable(sharded) else (lambda: ray.get(ref))
    ctx.checkpoints.submit(fetch, ctx.checkpoint_root, rnd, ctx.history, ctx.cfg.to_dict(),
                           ctx.meta)


# ---------------------------------------------------------------------------------- the run
def run_federation(cfg: Config, output: str | os.PathLike[str], resume: bool = False,
                   callbacks: Sequence[RunCallback] = (),
                   echo: Callable[[str], None] = print,
                   progress: PhaseProgress | None = None) -> dict[str, Any]:
    """Run (or resume) a federation described by ``cfg``; return ``summary.json``'s content.
    ``output`` is a local directory or a storage URI (``s3://bucket/prefix``, ``gs://``,
    ``hdfs://``, ``file://``). ``progress`` shows each phase of a round while it runs (None:
    one line per round only).

    Input problems (config, data, model, checkpoint, resources) raise :class:`ConfigError`
    before any round runs. Everything the driver can check is checked before Ray starts.
    """
    start_wall = time.perf_counter()
    preflight_ray()
    out = RunOutputs.open(output)  # a URI is probed with a small write first
    with storage.run_lock(out.location):
        ck = load_resume_checkpoint(out, cfg) if resume else None
        if resume and ck is None:
            echo(f"no checkpoint in {out.location}: starting from round 1")
        strategy = cfg.strategy.build()  # once per run, validated when cfg was parsed
        preflight_model(cfg.model)
        shards = build_shards(cfg.data, cfg.seed, out.local / "shards")
        ck, shards = with_joined(cfg.data.joined, ck, shards)
        if ck is not None and ck.num_clients != shards.num_clients:
            raise ConfigError(f"--resume {out.location}: checkpoint has {ck.num_clients} "
                              f"clients, the data has {shards.num_clients}")
        out.write_config(cfg.to_dict())
        out.publish_shards(shards.directory)
        echo(format_summary(shards.summary))
        placement = provision(cfg, shards.num_clients, echo)
        num_actors = placement.num_actors
        ctx = RunContext(cfg, out.local, shards, strategy, progress=progress, outputs=out,
                         placement=placement)
        summary = None
        try:
            summary = _run(ctx, ck, num_actors, callbacks, echo, start_wall)
        except BaseException as exc:
            _notify_error(callbacks, ctx, exc)
            raise
        finally:
            if ctx.checkpoints is not None:
                ctx.checkpoints.close()
            stop_actors(ctx, keep_warm=summary is not None)
    return summary


def _start(ctx: RunContext, ck: ckpt_io.Checkpoint | None, num_actors: int,
           echo: Callable[[str], None]) -> Layout:
    """Start the actors, initialize the server (or load the checkpoint into it), prepare the
    output files. Returns the adapter's layout."""
    ctx.shard_refs = {cid: ShardRef(cid, ray.put(p.read_bytes()))
                      for cid, p in enumerate(ctx.shards.paths)}
    info = start_actors(ctx, num_actors)
    assert ctx.server is not None and ctx.outputs is not None
    layout = Layout.from_dict(info["layout"])
    if ck is not None:
        mismatch = layout.first_difference(Layout.from_dict(ck.layout))
        if mismatch:
            raise ConfigError(f"--resume {ctx.outputs.location}: checkpoint adapter does "
                              f"not match the model ({mismatch})")
        ray.get(ctx.server.load_state_dict.remote(ck.tensors, layout))
        ctx.history, ctx.first_round = list(ck.history), ck.round + 1
        ctx.meta = dict(ck.extra)
        echo(f"resumed from {ck.path.name}: continuing at round {ctx.first_round}")
    else:
        ray.get(ctx.server.initialize.remote(ctx.actors[0].initial_state.remote(), layout))
    ctx.outputs.prepare(ctx.history, ck.round if ck is not None else 0, ck is None)
    return layout


def _run(ctx: RunContext, ck: ckpt_io.Checkpoint | None, num_actors: int,
         callbacks: Sequence[RunCallback], echo: Callable[[str], None],
         start_wall: float) -> dict[str, Any]:
    assert ctx.outputs is not None
    cfg, out, fed = ctx.cfg, ctx.outputs, ctx.cfg.federation
    layout = _start(ctx, ck, num_actors, echo)
    for cb in callbacks:
        cb.on_start(ctx)
    writer = ctx.checkpoints = ckpt_io.CheckpointWriter()
    for rnd in range(ctx.first_round, fed.rounds + 1):
        row, report = run_round(ctx, rnd, layout.size)
        ctx.history.append(row)
        out.record_round(row, report)
        if fed.checkpoint_due(rnd):
            submit_checkpoint(ctx, rnd)
        for cb in callbacks:
            cb.on_round(ctx, row, report)
        echo(format_round(row, fed.rounds))
    writer.wait()
    summary = summarize(cfg, ctx.history, time.perf_counter() - start_wall)
    out.write_summary(summary)
    for cb in callbacks:
        cb.on_end(ctx, summary)
    return summary


def _aggregate(ctx: RunContext, rnd: int, participants: list[int], done: list[tuple[int, Any]],
               orphans: list[int], dim: int) -> AggregationReport:
    """The server's aggregation of the fits that came back (it fetches the refs itself)."""
    assert ctx.server is not None
    need = min_reports(ctx.cfg.federation.min_report_fraction, len(participants))
    try:
        report: AggregationReport = ray.get(ctx.server.aggregate_refs.remote(
            rnd, [c for c, _ in done], [r for _, r in done], need))
    except ray.exceptions.RayError as exc:
        if getattr(ctx.server, "bounds", None) is None:
            raise
        from fedbip_ray.runtime.server import failure_reason

        raise RunFailed(f"round {rnd}: a server shard failed ({failure_reason(exc)}); "
                        "--resume continues from the last checkpoint") from None
    report.bytes_out = len(participants) * 4 * dim
    report.failed.update({c: NO_LIVE_ACTOR for c in orphans})
    if not report.aggregated:
        log.warning("round %d: %d of %d clients sent a valid update (%d needed): aggregation "
                    "skipped, states kept", rnd, len(report.accepted), len(participants), need)
    return report


def run_round(ctx: RunContext, rnd: int, dim: int) -> tuple[Row, AggregationReport]:
    """One round: fit (deadline), aggregate (validated, maybe skipped), heal, gate, evaluate."""
    cfg, fed = ctx.cfg, ctx.cfg.federation
    assert ctx.strategy is not None
    opts = ctx.strategy.client_options
    t0 = time.perf_counter()
    ctx.round = rnd
    n = ctx.shards.num_clients
    participants = sample_clients(n, cfg.clients_per_round(n), cfg.seed, rnd)
    clock = PhaseClock()
    fit = fit_phase(ctx, rnd, participants, opts.prox_mu, fed.round_deadline_s, opts.send_gradient,
                    bool(opts.gate_mixes) or opts.ala is not None)
    clock.lap("fit")
    report = _aggregate(ctx, rnd, participants, fit.done, fit.run.orphans, dim)
    clock.lap("aggregate")
    ran_on = fit.run.ran_on
    placed = ctx.placement.of_clients(ran_on) if ctx.placement is not None else None
    replaced = heal_actors(ctx, sorted(fit.run.dead | {ran_on[c] for c in report.failed
                                                       if c in ran_on}))
    if opts.gate_mixes and report.aggregated:
        gated = gate_phase(ctx, rnd, report.accepted, opts.gate_mixes, fed.round_deadline_s,
                           report.modified, ran_on, opts.gate_memory,
                           past_gate_scores(ctx.history, opts.gate_mixes) if opts.gate_memory
                           else None, opts.gate_ties)
        report.gate, report.gate_locals_sent = gated.chosen, gated.locals_sent
        report.gate_scores = gated.scores
        report.bytes_out += 4 * dim * (len(report.accepted) + report.gate_locals_sent)
        clock.lap("gate")
    if opts.ala is not None and report.aggregated:
        ala = ala_phase(ctx, rnd, report.accepted, opts.ala, fed.round_deadline_s,
                        report.modified, ran_on)
        report.diagnostics.update(ala)
        report.bytes_out += 4 * dim * (len(report.accepted) + int(ala["ala_locals_sent"]))
        clock.lap("ala")
    evals: dict[int, dict[str, dict]] = {}
    eval_failed: dict[int, str] = {}
    if rnd % fed.eval_every == 0 or rnd == fed.rounds:
        evals, eval_failed, more = evaluate_phase(
            ctx, rnd, opts.finetune_epochs_before_eval, fed.round_deadline_s)
        replaced += more
        clock.lap("eval")
    report.phase_seconds = clock.laps
    privacy = round_privacy(cfg, ctx.history, report.aggregated)
    row = round_row(rnd, evals, report, participants, fit.stragglers, time.perf_counter() - t0,
                    eval_failed, replaced, privacy, placed)
    return row, report
