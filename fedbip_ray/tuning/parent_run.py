"""The MLflow run that groups a search's trials (each trial's run is its child)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from fedbip_ray.config import Config
from fedbip_ray.tracking.mlflow_logger import flatten, git_tags, run_status_for
from fedbip_ray.tuning.space import TuneSettings
from fedbip_ray.tuning.trials import finite

log = logging.getLogger("fedbip.tune")


class ParentRun:
    """The MLflow run that groups a search's trials (children carry ``mlflow.parentRunId``)."""

    def __init__(self, cfg: Config, uri: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        self.experiment_id = (exp.experiment_id if exp
                              else self.client.create_experiment(cfg.tracking.experiment))
        self.run_id = ""
        self.cfg = cfg

    def start(self, settings: TuneSettings, output: Path) -> str:
        tags = {"mlflow.runName": f"{self.cfg.name}-tune", "fedbip.kind": "tune",
                "strategy": self.cfg.strategy.name, "output_dir": str(output), **git_tags()}
        self.run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        params = {f"tune.{k}": v
                  for k, v in flatten(settings.model_dump(mode="json", exclude={"space"})).items()}
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
            if finite(v):
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
