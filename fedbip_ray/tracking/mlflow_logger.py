"""MLflow for every run: params, per-round metrics, dataset inputs, matrices, heatmaps, plots,
adapters; a resumed run continues its MLflow run.

Embedded default: a local sqlite store ``sqlite:///mlflow.db`` in the working directory.
``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point to a server instead.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.tracking.plots import (
    accuracy_plot,
    block_heatmap_png,
    heatmap_png,
    histogram_png,
)
from fedbip_ray.tracking.run_info import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MetricLedger,
    byte_totals,
    changed_params,
    final_metrics,
    flatten,
    git_commit,
    git_dirty,
    git_tags,
    row_metrics,
    run_description,
    run_status_for,
    source_tags,
    where_to_look,
)

__all__ = ["DEFAULT_URI", "MlflowCallback", "absolute_tracking_uri", "accuracy_plot",
           "byte_totals", "ensure_experiment", "flatten", "git_commit", "git_dirty", "git_tags",
           "heatmap_png", "probe_tracking", "run_status_for", "tracking_uri"]

DEFAULT_URI = "sqlite:///mlflow.db"
HEATMAP_EVERY = 5
BATCH = 500  # metrics per log_batch call
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_ID_KEY, EXPERIMENT_ID_KEY = "mlflow_run_id", "mlflow_experiment_id"  # in RunContext.meta
log = logging.getLogger("fedbip.mlflow")


def tracking_uri(cfg: Config) -> str:
    """Config first, then ``MLFLOW_TRACKING_URI``, then the local sqlite store."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


TRACKING_SCHEMES = frozenset({"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                              "databricks", "databricks-uc", "uc"})


def probe_tracking(uri: str, timeout_s: float = 3.0) -> None:
    """ConfigError (one line) when an http(s) tracking server does not answer within
    ``timeout_s`` (MLflow's client would retry for minutes); local stores are not probed."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme and scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking URI {uri}: unknown scheme '{scheme}' (one of "
                          f"{', '.join(sorted(TRACKING_SCHEMES))}, or a local path)")
    if scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http(s) only
            resp.read(64)
    except urllib.error.HTTPError:
        return  # something answers (a proxy or an older server without /health)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        why = getattr(reason, "strerror", None) or str(reason) or type(exc).__name__
        raise ConfigError(f"tracking URI {uri}: no MLflow server answers ({why}); start one or "
                          "set tracking.mlflow: false") from None


def absolute_tracking_uri(uri: str, cwd: str | Path | None = None) -> str:
    """A tracking URI that means the same from any working directory: relative
    ``sqlite:///x.db`` / ``file:x`` stores become absolute (Ray Tune runs trials in trial dirs)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str((base / uri[len("file:"):]).resolve())
    if "://" not in uri and not uri.startswith("databricks"):
        return str((base / uri).resolve())  # a plain local path (file store)
    return uri


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if needed, tagged as a model-training experiment
    (``mlflow.experimentKind``) so the UI opens it on its runs, not on its GenAI traces view."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        except MlflowException:  # created meanwhile by another run (e.g. a Tune trial)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return str(exp.experiment_id)


def _ledger(client: Any, run_id: str, keys: list[str]) -> MetricLedger:
    """Which (metric, step) pairs run ``run_id`` holds, read from the tracking store."""
    return MetricLedger.from_history(
        {k: [m.step for m in client.get_metric_history(run_id, k)] for k in keys})


class MlflowCallback:
    """Run callback that mirrors a federation into one MLflow run (continued on ``--resume``).

    The run id and experiment id go into ``RunContext.meta`` (saved with every checkpoint); a
    resumed run reopens that MLflow run and logs each (metric, round) pair it does not hold yet.
    """

    def __init__(self, cfg: Config, parent_run_id: str | None = None,
                 log_adapters: bool = True) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.log_adapters = log_adapters
        self.uri = tracking_uri(cfg)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.client: Any = None
        self.ledger = MetricLedger()
        self.resumed = False
        self.status: str | None = None  # terminal status once set (FINISHED/FAILED/KILLED)
        self._placement: dict[str, str] = {}  # client -> "node/device" last logged
        probe_tracking(self.uri)

    # ------------------------------------------------------------------------------ start
    def on_start(self, run: Any) -> None:
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        logged_params: dict[str, str] = {}
        existing = self._existing_run(run) if run.first_round > 1 else None
        if existing is not None:
            logged_params = dict(existing.data.params)
            self._reopen(run, existing)
        else:
            self.experiment_id = ensure_experiment(self.client, self.cfg.tracking.experiment)
            created = self.client.create_run(self.experiment_id, tags=self._tags(run))
            self.run_id = created.info.run_id
            self._log_inputs(run)
        run.meta[RUN_ID_KEY], run.meta[EXPERIMENT_ID_KEY] = self.run_id, self.experiment_id
        self._log_params(flatten(self.cfg.to_dict()), logged_params)
        self.client.log_artifact(self.run_id, str(run.output / "config.yaml"))
        self.client.log_artifact(self.run_id, str(run.output / "shards" / "clients.json"), "data")

    def _tags(self, run: Any) -> dict[str, str]:
        tags = {"strategy": self.cfg.strategy.name, "mlflow.runName": self.cfg.name,
                "output_dir": str(run.output), **git_tags(), **source_tags(),
                "mlflow.note.content": run_description(self.cfg, run.output)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def _existing_run(self, run: Any) -> Any | None:
        """The MLflow run a resumed federation started (None: unknown here, or deleted)."""
        from mlflow.exceptions import MlflowException

        run_id = run.meta.get(RUN_ID_KEY)
        if not run_id:
            return None
        try:
            found = self.client.get_run(str(run_id))
        except MlflowException:
            log.warning("MLflow run %s of %s not found at %s: starting a new one", run_id,
                        run.output, self.uri)
            return None
        return found if found.info.lifecycle_stage == "active" else None

    def _reopen(self, run: Any, existing: Any) -> None:
        """Mark the run RUNNING again; log what it lacks of the checkpoint's rounds."""
        self.run_id, self.experiment_id = existing.info.run_id, existing.info.experiment_id
        self.resumed = True
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, "resumed_from_round", str(run.first_round - 1))
        self.ledger = _ledger(self.client, self.run_id, list(existing.data.metrics))
        for i, row in enumerate(run.history):
            self._log_metrics(row_metrics(row, run.history[:i + 1],
                                          self.cfg.tracking.per_client_metrics_limit),
                              int(row["round"]))
        if not existing.inputs.dataset_inputs:
            self._log_inputs(run)

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """Params the run lacks; changed values (MLflow keeps a param's first value) are noted
        in the tag ``changed_params``."""
        from mlflow.entities import Param

        items = [(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        changed = changed_params(logged, params)
        if changed:
            note = ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
            self.client.set_tag(self.run_id, "changed_params", note[:5000])

    def _log_inputs(self, run: Any) -> None:
        from fedbip_ray.tracking.datasets import shard_inputs

        inputs = shard_inputs(run.shards)
        for i in range(0, len(inputs), 100):
            self.client.log_inputs(self.run_id, datasets=inputs[i:i + 100])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        """Log the (metric, step) pairs the run does not hold yet."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        fresh = self.ledger.fresh(values, step)
        metrics = [Metric(k, v, ts, step) for k, v in fresh.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    # ------------------------------------------------------------------------------ rounds
    def on_round(self, run: Any, row: dict[str, Any], report: AggregationReport) -> None:
        step = int(row["round"])
        limit = self.cfg.tracking.per_client_metrics_limit
        self._log_metrics(row_metrics(row, run.history, limit), step)
        per_client = row.get("per_client_accuracy") or {}
        if len(per_client) > limit:
            self._log_histogram(step, list(per_client.values()))
        self._log_placement(row.get("placement") or {}, limit)
        last = step == run.cfg.federation.rounds
        png = last or step % HEATMAP_EVERY == 0 or step == 1
        if report.similarity is not None:
            self._log_matrices(step, report, png)
        elif report.summary is not None and report.summary.view.similarity is not None and png:
            self._log_views(step, report)

    def _log_placement(self, placement: dict[str, str], limit: int) -> None:
        """Where each client trained (``node/device``) as run tags ``placement.client_XXXX``,
        updated when a client moves (up to ``limit`` clients; metrics.jsonl has them all)."""
        from mlflow.entities import RunTag

        moved = {c: where for c, where in placement.items() if self._placement.get(c) != where}
        if not moved or len(placement) > limit:
            return
        self._placement.update(moved)
        tags = [RunTag(f"placement.client_{int(c):04d}", str(w)[:250]) for c, w in moved.items()]
        self.client.log_batch(self.run_id, tags=tags)

    def _log_histogram(self, step: int, values: list[float]) -> None:
        """Per-client accuracy of an evaluated round as a histogram PNG (many clients)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"client_accuracy_round_{step:05d}.png"
            histogram_png(values, f"per-client test accuracy, round {step} "
                          f"({len(values)} clients)", path)
            self.client.log_artifact(self.run_id, str(path), "plots")

    def _log_views(self, step: int, report: AggregationReport) -> None:
        """Block-view heatmaps of a round with too many participants for its full matrices."""
        assert report.summary is not None
        view, n = report.summary.view, len(report.accepted)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            if view.similarity is not None:
                block_heatmap_png(view.similarity, view.labels, f"task-vector cosine, round "
                                  f"{step} ({n} clients, block means)",
                                  d / f"similarity_round_{step:05d}.png")
            block_heatmap_png(view.weights, view.labels, f"personalized weights, round {step} "
                              f"({n} clients, block means)", d / f"weights_round_{step:05d}.png")
            self.client.log_artifacts(self.run_id, tmp, "matrices")

    def _log_matrices(self, step: int, report: AggregationReport, png: bool) -> None:
        clients = report.accepted
        assert report.similarity is not None and report.weights is not None
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / f"round_{step:05d}.json").write_text(json.dumps(
                {"round": step, "clients": clients, "similarity": report.similarity.tolist(),
                 "weights": report.weights.tolist()}))
            if png:
                heatmap_png(report.similarity, clients, f"task-vector cosine, round {step}",
                            d / f"similarity_round_{step:05d}.png")
                heatmap_png(report.weights, clients, f"personalized weights, round {step}",
                            d / f"weights_round_{step:05d}.png")
            self.client.log_artifacts(self.run_id, tmp, "matrices")

    # ------------------------------------------------------------------------------ end
    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            accuracy_plot(run.history, d / "accuracy_per_round.png")
            self.client.log_artifact(self.run_id, str(d / "accuracy_per_round.png"), "plots")
        self.client.log_artifact(self.run_id, str(run.output / "summary.json"))
        self.client.log_artifact(self.run_id, str(run.output / "metrics.jsonl"))
        if self.log_adapters:
            self._log_adapters(run)
        last = int(run.history[-1]["round"]) if run.history else 0
        self._log_metrics(final_metrics(summary, run.history), last)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.status = "FINISHED"

    def _log_adapters(self, run: Any) -> None:
        """Every client's personalized adapter, in peft format, under ``adapters/``."""
        import ray

        refs = {cid: run.actor_for(cid).export_adapter.remote(cid, run.server.get_state.remote(cid))
                for cid in range(run.shards.num_clients)}
        with tempfile.TemporaryDirectory() as tmp:
            for cid, ref in refs.items():
                files = ray.get(ref)
                target = Path(tmp) / f"client_{cid:04d}"
                target.mkdir()
                for name, data in files.items():
                    (target / name).write_bytes(data)
            self.client.log_artifacts(self.run_id, tmp, "adapters")

    def where_to_look(self) -> str | None:
        """Where the run can be seen: its URL on a tracking server, else the local store and
        how to open the dashboard on it (None before ``on_start``)."""
        if self.run_id is None or self.experiment_id is None:
            return None
        default = absolute_tracking_uri(DEFAULT_URI, REPO_ROOT)  # what scripts/mlflow_ui.sh serves
        return where_to_look(absolute_tracking_uri(self.uri), self.experiment_id, self.run_id,
                             default)

    def on_error(self, run: Any, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for an interrupt or a Tune stop) with the error as a tag
        and ``error.txt``; idempotent, and never raises (the original error matters more)."""
        if self.run_id is None or self.client is None or self.status is not None:
            return
        import traceback

        status = run_status_for(exc)
        try:
            if isinstance(exc, SystemExit):  # how Ray Tune stops a trial (e.g. ASHA)
                self.client.set_tag(self.run_id, "stopped",
                                    "SystemExit (e.g. stopped by a Ray Tune scheduler)")
            else:
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.client.set_tag(self.run_id, "error", f"{type(exc).__name__}: {first}"[:500])
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                self.client.log_text(self.run_id, text, "error.txt")
            if run is not None and getattr(run, "history", None):
                self.client.log_artifact(self.run_id, str(run.output / "metrics.jsonl"))
        except Exception:  # noqa: BLE001 - best effort: the status below matters most
            log.warning("could not log the error of run %s to MLflow", self.run_id, exc_info=True)
        try:
            self.client.set_terminated(self.run_id, status)
            self.status = status
        except Exception:  # noqa: BLE001
            log.warning("could not mark MLflow run %s as %s", self.run_id, status, exc_info=True)
