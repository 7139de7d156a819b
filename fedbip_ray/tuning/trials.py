"""One Tune trial: its resources (one bundle per client actor), the federation it runs, what it
reports each round, and reading the trials back after the search (pure parts first)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from fedbip_ray.config import Config, ConfigError, config_from_dict
from fedbip_ray.runtime.acquire import (
    ClusterLimits,
    bundle_shape,
    ceiling_capacity,
    describe_limits,
    format_bundle,
    plan_num_actors,
)
from fedbip_ray.runtime.cluster import plan_actors
from fedbip_ray.runtime.federation import run_federation
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.runtime.rows import worst_fraction_mean
from fedbip_ray.tracking.mlflow_logger import MlflowCallback
from fedbip_ray.tuning.space import TuneSettings, apply_params, plain, set_dotted

log = logging.getLogger("fedbip.tune")

#: Metrics every trial reports per evaluated round (the first three drive the search display).
REPORTED = ("round", "mean_val_accuracy", "worst10_val_accuracy", "train_loss", "mean_accuracy",
            "worst10_accuracy", "bytes_in", "bytes_out", "round_seconds")


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


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def pick_best(trials: Sequence[Mapping[str, Any]], metric: str, mode: str, rounds: int
              ) -> Mapping[str, Any]:
    """The best trial by its last reported ``metric``, preferring trials that ran all
    ``rounds`` (ASHA stops weak trials early; a trial judged on round 1 is not comparable).
    Ties go to the earlier trial. ValueError if no trial reported the metric."""
    scored = [t for t in trials if finite((t.get("last") or {}).get(metric))]
    if not scored:
        raise ValueError(f"no trial reported a finite {metric}")
    complete = [t for t in scored if int(t["last"].get("round", 0)) >= rounds]
    pool = complete or scored
    sign = 1.0 if mode == "max" else -1.0
    return max(pool, key=lambda t: sign * float(t["last"][metric]))  # max keeps the first of ties


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
    mlflow_cb = (MlflowCallback(cfg, parent_run_id, log_adapters=log_adapters)
                 if cfg.tracking.mlflow else None)
    callbacks = ([mlflow_cb] if mlflow_cb else []) + [TuneReportCallback(mlflow_cb)]
    run_federation(cfg, child(root, "trials", trial_id), callbacks=callbacks, echo=log.info)


def child(root: str, *names: str) -> str:
    """``root/names...`` for a local path or a storage URI."""
    return "/".join([root.rstrip("/"), *names])


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
        trials.append({"trial_id": str(trial_id),
                       "params": {k: plain(v) for k, v in (res.config or {}).items()},
                       "last": last, "status": status,
                       "mlflow_run_id": last.pop("mlflow_run_id", None),
                       "error": (None if res.error is None
                                 else str(res.error).splitlines()[0][:300])})
    return trials
