"""MLflow for ``fedbip join``: the join is an MLflow run of its own, tagged with (and nested
under) the federation's run, with each newcomer's similarity row, weights and adapter."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbip_ray.config import Config
from fedbip_ray.tracking.mlflow_logger import git_tags, probe_tracking, tracking_uri

log = logging.getLogger("fedbip.mlflow")
FEDERATION_TAG = "federation_run_id"


def federation_run_id(client: Any, extra: Mapping[str, Any], run_dir: Path,
                      experiment: str) -> str | None:
    """The federation's MLflow run id: the checkpoint's ``extra.mlflow_run_id`` when it holds
    one, else the latest run of ``experiment`` tagged with the run's output directory."""
    rid = extra.get("mlflow_run_id")
    if isinstance(rid, str) and rid:
        return rid
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    for tag in dict.fromkeys([str(run_dir), str(run_dir.resolve())]):
        quoted = tag.replace("'", "\\'")
        runs = client.search_runs([exp.experiment_id], f"tags.output_dir = '{quoted}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return str(runs[0].info.run_id)
    return None


def log_join(cfg: Config, run_dir: Path, extra: Mapping[str, Any], out: Path,
             results: Sequence[Any]) -> str:
    """Create the join's MLflow run (params, per-newcomer metrics, ``newcomers/<dir>/``
    artifacts: join.json with the similarity row and weights, the peft adapter); its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    probe_tracking(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    fed = federation_run_id(client, extra, run_dir, cfg.tracking.experiment)
    tags = {"mlflow.runName": f"{cfg.name}-join", "kind": "join", "strategy": cfg.strategy.name,
            "output_dir": str(out), "run_dir": str(run_dir), **git_tags()}
    if fed:
        tags[FEDERATION_TAG] = tags["mlflow.parentRunId"] = fed
    run_id = str(client.create_run(exp_id, tags=tags).info.run_id)
    try:
        client.log_param(run_id, "newcomers", str(len(results)))
        for r in results:
            prefix = r.directory
            client.log_metric(run_id, f"{prefix}_test_accuracy", float(r.test.get("accuracy", 0)))
            client.log_metric(run_id, f"{prefix}_local_test_accuracy",
                              float(r.local_test.get("accuracy", 0)))
            client.log_metric(run_id, f"{prefix}_mix", float(r.mix))
            client.log_metric(run_id, f"{prefix}_self_weight", float(r.self_weight))
            _log_newcomer(client, run_id, out / r.directory, r)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _log_newcomer(client: Any, run_id: str, directory: Path, result: Any) -> None:
    """``newcomers/<dir>/join.json`` (with ``mlflow_run_id``) and ``.../adapter/``."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        doc = {**result.to_dict(), "mlflow_run_id": run_id}
        path = Path(tmp) / "join.json"
        path.write_text(json.dumps(doc, indent=1, default=str).replace("NaN", "null"))
        client.log_artifact(run_id, str(path), f"newcomers/{result.directory}")
    client.log_artifacts(run_id, str(directory / "adapter"),
                         f"newcomers/{result.directory}/adapter")
