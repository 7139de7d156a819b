"""Ray Tune search over a federation's parameters (``fedbip tune CONFIG.yaml``).

Each trial is one federation (:func:`run_federation`) inside a Ray
Tune function trainable. Every evaluated round the trial calls ``tune.report`` with validation
metrics (selection and the ASHA scheduler use validation only; test accuracy rides along for
the final summary). A trial reserves a placement group with an empty head bundle for the trial
driver and one bundle per client actor; Tune runs trainables with
``placement_group_capture_child_tasks=True``, so the trial's client actors are scheduled inside
its own reservation, and ``resources.max_actors`` is pinned to the number of bundles: a trial
can never wait on resources held by another trial.

Outputs at the output location (a path or a storage URI): ``best_config.yaml`` (a plain run
config: ``fedbip run`` it),
``tune_summary.json``, ``trials/<trial_id>/`` (each federation's run directory) and
``ray_results/`` (Tune's own). With MLflow on, one parent run holds every trial as a child run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from fedbip_ray import storage
from fedbip_ray.config import Config, config_from_dict
from fedbip_ray.config_io import dump_config
from fedbip_ray.runtime import actor_pool
from fedbip_ray.runtime.cluster import ensure_ray, joined_limits
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.runtime.outputs import is_uri, local_side
from fedbip_ray.tracking.mlflow_logger import (
    MlflowCallback,
    absolute_tracking_uri,
    tracking_uri,
)
from fedbip_ray.tuning.parent_run import ParentRun
from fedbip_ray.tuning.space import (
    ParamSpec,
    TuneSettings,
    apply_params,
    check_space,
    load_tune_config,
    set_dotted,
)
from fedbip_ray.tuning.trials import (
    child,
    collect_trials,
    federation_trainable,
    finite,
    pick_best,
    trial_bundles,
)

log = logging.getLogger("fedbip.tune")



# ---------------------------------------------------------------------------------- pure parts
def absolutize_paths(data: Mapping[str, Any], cwd: str | Path, uri: str) -> dict[str, Any]:
    """The run-config mapping with paths made absolute and the tracking URI pinned to ``uri``.

    Tune runs each trainable in its trial directory, so relative data/model paths and a
    relative ``sqlite:///mlflow.db`` would otherwise point elsewhere inside a trial.
    """
    base = Path(cwd)
    out = set_dotted(data, "tracking.tracking_uri", uri)
    for key in ("data.path", "data.shard_dir", "model.name"):
        node: Any = out
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if (isinstance(node, str) and node and not Path(node).is_absolute()
                and (base / node).exists()):
            out = set_dotted(out, key, str((base / node).resolve()))
    return out






def tune_domains(space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Ray Tune sampling domains for the parsed space (same semantics as :func:`sample_space`)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        v = spec.values
        if spec.kind == "uniform":
            out[key] = tune.uniform(float(v[0]), float(v[1]))
        elif spec.kind == "loguniform":
            out[key] = tune.loguniform(float(v[0]), float(v[1]))
        elif spec.kind == "randint":
            out[key] = tune.randint(int(v[0]), int(v[1]) + 1)
        elif spec.kind == "choice":
            out[key] = tune.choice(list(v))
        else:
            out[key] = tune.grid_search(list(v))
    return out


def short_name(key: str) -> str:
    """A column name for a dotted key (its last two parts)."""
    return ".".join(key.split(".")[-2:])


def make_reporter(settings: TuneSettings) -> Any:
    """The console progress table: trial status, round, validation metrics and parameters."""
    metrics = {"round": "round", "mean_val_accuracy": "val_acc",
               "worst10_val_accuracy": "worst10_val", "train_loss": "train_loss"}
    return CLIReporter(metric_columns=metrics,
                       parameter_columns={k: short_name(k) for k in settings.space},
                       sort_by_metric=True, max_report_frequency=10)






# ---------------------------------------------------------------------------------- driver


def _fit(settings: TuneSettings, data: dict[str, Any], actors: int, bundles: list[dict[str, float]],
         root: str, parent_run_id: str | None, rounds: int) -> Any:
    """Tune's search; trials write their runs under ``root`` (a path or a storage URI), and
    Tune keeps its own state there too (``root/ray_results``)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores CLIReporter
    trainable = tune.with_resources(
        tune.with_parameters(federation_trainable, data=data, actors=actors, root=root,
                             env=storage.provider_env() if is_uri(root) else None,
                             parent_run_id=parent_run_id, log_adapters=settings.log_adapters),
        tune.PlacementGroupFactory(bundles))
    if settings.scheduler == "asha":
        scheduler: Any = ASHAScheduler(time_attr="round", max_t=rounds,
                                       grace_period=min(settings.grace_period, rounds),
                                       reduction_factor=settings.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable, param_space=tune_domains(settings.space),
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=settings.seed,
                                             max_concurrent=settings.max_concurrent),
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(
            name="search", **tune_storage(root), verbose=1,
            progress_reporter=make_reporter(settings),
            failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def tune_storage(root: str) -> dict[str, Any]:
    """Tune's ``storage_path`` (and filesystem, for a URI) under ``root``."""
    if not is_uri(root):
        return {"storage_path": str(Path(root) / "ray_results")}
    loc = storage.open_location(root) / "ray_results"
    return {"storage_path": loc.path, "storage_filesystem": loc.filesystem}


def final_test(best: Mapping[str, Any], best_cfg: Config, settings: TuneSettings, output: str,
               parent_run_id: str | None) -> tuple[float | None, str, str | None]:
    """(test mean accuracy, where it comes from, MLflow run id of a rerun).

    ``trial``: the best trial's test accuracy at the round it was selected on. Selection saw
    validation only, so this is an untouched held-out number, and a federation is seeded, so
    a rerun would reproduce it at the cost of one more federation. ``rerun``: run the best
    config once more (a fresh federation, child run ``<name>-best``) and report its test.
    """
    if settings.final_eval == "trial":
        value = best["last"].get("mean_accuracy")
        return (float(value) if finite(value) else None,
                f"trial {best['trial_id']} round {best['last'].get('round')}", None)

    cbs = ([MlflowCallback(best_cfg, parent_run_id, log_adapters=True)]
           if best_cfg.tracking.mlflow else [])
    summary = run_federation(best_cfg, child(output, "best_rerun"), callbacks=cbs, echo=log.info)
    return summary.get("mean_accuracy"), "rerun of the best config", cbs[0].run_id if cbs else None


def run_tune(config_path: str | Path, overrides: Sequence[str] = (),
             output: str | Path | None = None) -> dict[str, Any]:
    """Run the search described by a tune config; return (and write) ``tune_summary.json``.
    ``output`` is a local directory or a storage URI (default ``runs/<name>-tune``)."""
    start = time.perf_counter()
    data, cfg, settings = load_tune_config(config_path, overrides)
    uri = absolute_tracking_uri(tracking_uri(cfg))
    run_data = absolutize_paths(data, Path.cwd(), uri)
    check_space(run_data, settings)
    target = str(output or Path("runs") / f"{cfg.name}-tune")
    remote = storage.probe(target) if is_uri(target) else None  # one line if unusable
    out = local_side(target).resolve()  # the search's local files (its own, or a working copy)
    out.mkdir(parents=True, exist_ok=True)
    root = target if remote is not None else str(out)
    ensure_ray()
    actor_pool.release()  # the trials' bundles need what warm actors would hold
    actors, bundles = trial_bundles(cfg, settings, ray.cluster_resources(), joined_limits(cfg))
    parent = ParentRun(cfg, uri) if cfg.tracking.mlflow else None
    parent_id = parent.start(settings, out) if parent else None
    trials: list[dict[str, Any]] = []
    rounds = cfg.federation.rounds
    try:
        results = _fit(settings, run_data, actors, bundles, root, parent_id, rounds)
        trials = collect_trials(results, rounds)
        try:
            best = pick_best(trials, settings.metric, settings.mode, rounds)
        except ValueError:
            first = next((t["error"] for t in trials if t["error"]), "no metrics reported")
            raise RuntimeError(f"tune: no trial produced {settings.metric} "
                               f"({len(trials)} trials; first error: {first})") from None
        best_data = apply_params(data, best["params"])
        best_data = set_dotted(best_data, "name", f"{cfg.name}-best")
        best_cfg = config_from_dict(best_data)
        dump_config(best_cfg, out / "best_config.yaml")
        rerun_cfg = config_from_dict(set_dotted(best_data, "tracking.tracking_uri", uri))
        test, source, rerun_id = final_test(best, rerun_cfg, settings, root, parent_id)
        summary = {
            "metric": settings.metric, "mode": settings.mode,
            "best": {"trial_id": best["trial_id"], "params": best["params"],
                     "metric_value": best["last"][settings.metric],
                     "round": best["last"].get("round"),
                     "test_mean_accuracy": test, "test_source": source,
                     "mlflow_run_id": best.get("mlflow_run_id"), "rerun_mlflow_run_id": rerun_id,
                     "output": child(root, "trials", best["trial_id"])},
            "best_config": child(root, "best_config.yaml"),
            "actors_per_trial": actors, "trial_bundles": bundles,
            "parent_run_id": parent_id, "trials": trials,
            "wall_seconds": time.perf_counter() - start,
        }
        write_summary(summary, out, remote)
        if parent:
            parent.close_children(trials, rounds)
            parent.finish(summary, out)
        return summary
    except BaseException as exc:
        if parent:
            parent.close_children(trials, rounds)
            parent.fail(exc)
        raise


def write_summary(summary: Mapping[str, Any], out: Path, remote: storage.Location | None) -> None:
    """``tune_summary.json`` in the search's local directory and, for a URI output, beside its
    trials on the store (with ``best_config.yaml``)."""
    (out / "tune_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if remote is not None:
        for name in ("tune_summary.json", "best_config.yaml"):
            (remote / name).write_bytes((out / name).read_bytes())


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for the console: the best parameters and their validation/test accuracy."""
    best = summary["best"]
    lines = [f"best trial {best['trial_id']} (round {best['round']}): "
             f"{summary['metric']} {best['metric_value']:.4f}"]
    for key, value in best["params"].items():
        lines.append(f"  {key} = {value!r}")
    test = best["test_mean_accuracy"]
    lines.append(f"test mean accuracy {test:.4f} ({best['test_source']})" if test is not None
                 else "test mean accuracy: n/a")
    counts = {s: sum(t["status"] == s for t in summary["trials"])
              for s in ("complete", "stopped", "error")}
    lines.append(f"trials: {counts['complete']} complete, {counts['stopped']} stopped early, "
                 f"{counts['error']} failed  ({summary['wall_seconds']:.0f}s)")
    lines.append(f"best config: {summary['best_config']}")
    return "\n".join(lines)
