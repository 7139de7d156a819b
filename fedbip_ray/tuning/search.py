"""Ray Tune search over a federation's parameters (``fedbip tune CONFIG.yaml``).

Each trial is one federation (:func:`run_federation`) inside a Ray
Tune function trainable. Every evaluated round the trial calls ``tune.report`` with validation
metrics (selection and the ASHA scheduler use validation only; test accuracy rides along for
the final summary). A trial reserves a placement group with an empty head bundle for the trial
driver and one bundle per client actor; Tune runs trainables with
``placement_group_capture_child_tasks=True``, so the trial's client actors are scheduled inside
its own reservation, and ``resources.max_actors`` is pinned to the number of bundles: a trial
can never wait on resources held by another trial.

Outputs in the output directory: ``best_config.yaml`` (a plain run config: ``fedbip run`` it),
``tune_summary.json``, ``trials/<trial_id>/`` (each federation's run directory) and
``ray_results/`` (Tune's own). With MLflow on, one parent run holds every trial as a child run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from fedbip_ray import storage
from fedbip_ray.config import Config, ConfigError, config_from_dict, dump_config
from fedbip_ray.runtime.acquire import (
    ClusterLimits,
    bundle_shape,
    ceiling_capacity,
    describe_limits,
    format_bundle,
    plan_num_actors,
)
from fedbip_ray.runtime.cluster import ensure_ray, joined_limits, plan_actors
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.runtime.outputs import is_uri, local_side
from fedbip_ray.runtime.rows import worst_fraction_mean
from fedbip_ray.tracking.mlflow_logger import (
    MlflowCallback,
    absolute_tracking_uri,
    flatten,
    git_tags,
    run_status_for,
    tracking_uri,
)
from fedbip_ray.tuning.space import (
    ParamSpec,
    TuneSettings,
    apply_params,
    check_space,
    load_tune_config,
    plain,
    set_dotted,
)

log = logging.getLogger("fedbip.tune")

#: Metrics every trial reports per evaluated round (the first three drive the search display).
REPORTED = ("round", "mean_val_accuracy", "worst10_val_accuracy", "train_loss", "mean_accuracy",
            "worst10_accuracy", "bytes_in", "bytes_out", "round_seconds")


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
        if isinstance(node, str) and node and not Path(node).is_absolute() and (base / node).exists():
            out = set_dotted(out, key, str((base / node).resolve()))
    return out


def trial_bundles(cfg: Config, settings: TuneSettings, cluster: Mapping[str, float],
                  limits: ClusterLimits | None = None) -> tuple[int, list[dict[str, float]]]:
    """(client actors per trial, placement-group bundles of one trial).

    The head bundle (the trial's driver, which only waits on actors) is empty; then one bundle
    per client actor with the client's CPUs/GPUs. Per trial: ``tune.actors_per_trial``, else
    ``resources.num_actors``, else the cluster's actor capacity split evenly over
    ``max_concurrent`` trials. The capacity is the run's own planning: what ``cluster`` (the
    embedded local Ray) has now, or, with ``limits`` (a joined cluster), what it could ever
    hold, autoscaler included: Tune's placement group per trial is then the autoscaler's
    request. ConfigError if one trial cannot fit at all.
    """

    rc = cfg.resources
    bundle = bundle_shape(rc.num_cpus_per_client, rc.num_gpus_per_client)
    if limits is None:
        capacity = plan_actors(cfg, dict(cluster))  # ConfigError if not even one actor fits
    else:
        capacity = plan_num_actors(cfg.data.num_clients, bundle, limits, max_actors=rc.max_actors)
    source = "tune.actors_per_trial" if settings.actors_per_trial else "resources.num_actors"
    n = settings.actors_per_trial or rc.num_actors or max(1, capacity // settings.max_concurrent)
    n = min(n, cfg.data.num_clients)
    ceiling = ceiling_capacity(bundle, limits) if limits is not None and bundle else None
    if ceiling is not None and n > ceiling:
        raise ConfigError(f"{source}={n}: one trial needs {n} bundles {format_bundle(bundle)}, the "
                          f"cluster can hold at most {ceiling} ({describe_limits(limits)})")
    for res, per in bundle.items():
        have = float(cluster.get(res, 0.0))
        if limits is None and per * n > have:
            raise ConfigError(f"{source}={n}: one trial needs {per * n:g} {res} "
                              f"({n} client actors x {per:g}), the Ray cluster has {have:g}")
    if not bundle:  # clients need no resources: reserve one CPU for the trial itself
        return n, [{"CPU": 1.0}]
    return n, [{}] + [dict(bundle) for _ in range(n)]


def round_metrics(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a trial reports for one round (None for a round without evaluation)."""
    if row.get("mean_val_accuracy") is None:
        return None
    vals = [float(v) for v in row.get("per_client_val_accuracy", {}).values() if v == v]
    out = {
        "round": int(row["round"]),
        "mean_val_accuracy": float(row["mean_val_accuracy"]),
        "worst10_val_accuracy": worst_fraction_mean(vals) if vals else float("nan"),
        "mean_accuracy": row.get("mean_accuracy"),
        "worst10_accuracy": row.get("worst10_accuracy"),
        "train_loss": row.get("train_loss"),
        "bytes_in": int(row.get("bytes_in") or 0),
        "bytes_out": int(row.get("bytes_out") or 0),
        "round_seconds": float(row.get("seconds") or 0.0),
    }
    return {k: (float("nan") if v is None else v) for k, v in out.items()}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def pick_best(trials: Sequence[Mapping[str, Any]], metric: str, mode: str, rounds: int
              ) -> Mapping[str, Any]:
    """The best trial by its last reported ``metric``, preferring trials that ran all
    ``rounds`` (ASHA stops weak trials early; a trial judged on round 1 is not comparable).
    Ties go to the earlier trial. ValueError if no trial reported the metric."""
    scored = [t for t in trials if _finite((t.get("last") or {}).get(metric))]
    if not scored:
        raise ValueError(f"no trial reported a finite {metric}")
    complete = [t for t in scored if int(t["last"].get("round", 0)) >= rounds]
    pool = complete or scored
    sign = 1.0 if mode == "max" else -1.0
    return max(pool, key=lambda t: sign * float(t["last"][metric]))  # max keeps the first of ties


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


# ---------------------------------------------------------------------------------- trial side
class TuneReportCallback:
    """Run callback: ``tune.report`` of :func:`round_metrics` each evaluated round.

    The last round is reported from ``on_end`` (after the other callbacks' ``on_end``): Tune
    stops a trial that reaches the scheduler's ``max_t`` inside ``tune.report``, which would
    otherwise cut off the run's summary, final MLflow logging and adapters.
    """

    def __init__(self, mlflow_cb: Any = None) -> None:
        self.mlflow_cb = mlflow_cb
        self._final: dict[str, Any] | None = None

    def on_start(self, run: Any) -> None:
        pass

    def on_round(self, run: Any, row: dict[str, Any], report: AggregationReport) -> None:
        metrics = round_metrics(row)
        if metrics is None:
            return
        if self.mlflow_cb is not None and self.mlflow_cb.run_id:
            metrics["mlflow_run_id"] = self.mlflow_cb.run_id
        if int(row["round"]) >= run.cfg.federation.rounds:
            self._final = metrics
            return
        _report(metrics)

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        if self._final is not None:
            _report(self._final)


def _report(metrics: dict[str, Any]) -> None:
    tune.report(metrics)


def federation_trainable(params: dict[str, Any], *, data: dict[str, Any], actors: int,
                         root: str, parent_run_id: str | None, log_adapters: bool,
                         env: dict[str, str] | None = None) -> None:
    """One Tune trial: the base run config + ``params`` as one federation. ``env``: the
    driver's storage credentials and endpoints, for a trial on any node."""
    os.environ.update(env or {})


    trial_id = tune.get_context().get_trial_id()
    run_data = apply_params(data, params)
    run_data = set_dotted(run_data, "name", f"{data.get('name', 'fedbip')}-{trial_id}")
    run_data = set_dotted(run_data, "resources.max_actors", actors)
    cfg = config_from_dict(run_data)
    mlflow_cb = MlflowCallback(cfg, parent_run_id, log_adapters=log_adapters) if cfg.tracking.mlflow else None
    callbacks = ([mlflow_cb] if mlflow_cb else []) + [TuneReportCallback(mlflow_cb)]
    run_federation(cfg, child(root, "trials", trial_id), callbacks=callbacks, echo=log.info)


def child(root: str, *names: str) -> str:
    """``root/names...`` for a local path or a storage URI."""
    return "/".join([root.rstrip("/"), *names])


# ---------------------------------------------------------------------------------- MLflow parent
class ParentRun:
    """The MLflow run that groups a search's trials (children carry ``mlflow.parentRunId``)."""

    def __init__(self, cfg: Config, uri: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.tracking.experiment)
        self.run_id = ""
        self.cfg = cfg

    def start(self, settings: TuneSettings, output: Path) -> str:
        tags = {"mlflow.runName": f"{self.cfg.name}-tune", "fedbip.kind": "tune",
                "strategy": self.cfg.strategy.name, "output_dir": str(output), **git_tags()}
        self.run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        params = {f"tune.{k}": v for k, v in flatten(settings.model_dump(mode="json", exclude={"space"})).items()}
        params.update({f"base.{k}": v for k, v in flatten(self.cfg.to_dict()).items()})
        params.update({f"space.{k}": json.dumps({s.kind: list(s.values)})[:500]
                       for k, s in settings.space.items()})
        items = list(params.items())
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        return self.run_id

    def children(self) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=10_000)

    def close_children(self, trials: Sequence[Mapping[str, Any]], rounds: int) -> None:
        """Tag each child with its trial's fate; a child left RUNNING (its trial was stopped
        by the scheduler or died) is ended KILLED."""
        by_run = {t.get("mlflow_run_id"): t for t in trials if t.get("mlflow_run_id")}
        for run in self.children():
            trial = by_run.get(run.info.run_id)
            if trial is not None:
                self.client.set_tag(run.info.run_id, "tune.trial_id", trial["trial_id"])
                last_round = int((trial.get("last") or {}).get("round", 0))
                self.client.set_tag(run.info.run_id, "tune.early_stopped",
                                    str(trial["error"] is None and last_round < rounds).lower())
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")

    def finish(self, summary: Mapping[str, Any], output: Path) -> None:
        best = summary["best"]
        metrics = {f"best_{summary['metric']}": best["metric_value"],
                   "best_test_mean_accuracy": best["test_mean_accuracy"],
                   "num_trials": len(summary["trials"]),
                   "trials_complete": sum(t["status"] == "complete" for t in summary["trials"]),
                   "trials_stopped_early": sum(t["status"] == "stopped" for t in summary["trials"]),
                   "wall_seconds": summary["wall_seconds"]}
        for k, v in metrics.items():
            if _finite(v):
                self.client.log_metric(self.run_id, k, float(v))
        self.client.set_tag(self.run_id, "best_trial_id", best["trial_id"])
        if best.get("mlflow_run_id"):
            self.client.set_tag(self.run_id, "best_run_id", best["mlflow_run_id"])
        for name in ("best_config.yaml", "tune_summary.json"):
            self.client.log_artifact(self.run_id, str(output / name))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        try:
            self.client.set_tag(self.run_id, "error", f"{type(exc).__name__}: {exc}"[:500])
            self.client.set_terminated(self.run_id, run_status_for(exc))
        except Exception:  # noqa: BLE001 - never mask the original error
            log.warning("could not mark the parent MLflow run as failed", exc_info=True)


# ---------------------------------------------------------------------------------- driver
def collect_trials(results: Any, rounds: int) -> list[dict[str, Any]]:
    """One plain dict per trial from a Tune ResultGrid: id, params, last report, status."""
    trials = []
    for res in results:
        metrics = dict(res.metrics or {})
        last = {k: plain(metrics[k]) for k in (*REPORTED, "mlflow_run_id") if k in metrics}
        trial_id = metrics.get("trial_id") or Path(res.path).name
        if res.error is not None:
            status = "error"
        elif int(last.get("round", 0)) >= rounds:
            status = "complete"
        else:
            status = "stopped"
        trials.append({"trial_id": str(trial_id), "params": {k: plain(v) for k, v in (res.config or {}).items()},
                       "last": last, "status": status, "mlflow_run_id": last.pop("mlflow_run_id", None),
                       "error": None if res.error is None else str(res.error).splitlines()[0][:300]})
    return trials


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
        return (float(value) if _finite(value) else None,
                f"trial {best['trial_id']} round {best['last'].get('round')}", None)

    cbs = [MlflowCallback(best_cfg, parent_run_id, log_adapters=True)] if best_cfg.tracking.mlflow else []
    summary = run_federation(best_cfg, child(output, "best_rerun"), callbacks=cbs, echo=log.info)
    return summary.get("mean_accuracy"), "rerun of the best config", cbs[0].run_id if cbs else None


def run_tune(config_path: str | Path, overrides: Sequence[str] = (),
             output: str | Path | None = None) -> dict[str, Any]:
    """Run the search described by a tune config; return (and write) ``tune_summary.json``."""


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
                     "metric_value": best["last"][settings.metric], "round": best["last"].get("round"),
                     "test_mean_accuracy": test, "test_source": source,
                     "mlflow_run_id": best.get("mlflow_run_id"), "rerun_mlflow_run_id": rerun_id,
                     "output": child(root, "trials", best["trial_id"])},
            "best_config": child(root, "best_config.yaml"),
            "actors_per_trial": actors, "trial_bundles": bundles,
            "parent_run_id": parent_id, "trials": trials,
            "wall_seconds": time.perf_counter() - start,
        }
        (out / "tune_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if remote is not None:  # the search's own files beside its trials on the store
            for name in ("tune_summary.json", "best_config.yaml"):
                (remote / name).write_bytes((out / name).read_bytes())
        if parent:
            parent.close_children(trials, rounds)
            parent.finish(summary, out)
        return summary
    except BaseException as exc:
        if parent:
            parent.close_children(trials, rounds)
            parent.fail(exc)
        raise


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
    counts = {s: sum(t["status"] == s for t in summary["trials"]) for s in ("complete", "stopped", "error")}
    lines.append(f"trials: {counts['complete']} complete, {counts['stopped']} stopped early, "
                 f"{counts['error']} failed  ({summary['wall_seconds']:.0f}s)")
    lines.append(f"best config: {summary['best_config']}")
    return "\n".join(lines)
