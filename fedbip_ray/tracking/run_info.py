"""What an MLflow run says about a federation, as pure functions: params, metrics per round,
provenance tags (git, source), the description, the run's address, and which (metric, step)
pairs a run already holds."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbip_ray.config import Config

# MLflow 3.x opens an experiment without this tag on its GenAI (traces) view
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_SCRIPT = "bash scripts/mlflow_ui.sh"
UI_URL = "http://127.0.0.1:5000"
TRAINING_VIEW = "workflowType=machine_learning"  # UI query: the model-training view
ROW_COUNTS = {"clients_accepted": "accepted", "clients_failed": "failed",
              "clients_rejected": "rejected", "stragglers": "stragglers"}
ROW_VALUES = ("mean_accuracy", "std_accuracy", "worst10_accuracy", "mean_val_accuracy",
              "test_loss", "train_loss")
FINAL_KEYS = ("mean_accuracy", "worst10_accuracy", "mean_val_accuracy", "wall_seconds")
PER_CLIENT_LIMIT = 100  # tracking.per_client_metrics_limit's default
QUANTILES = ("min", "p10", "p50", "p90", "max")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} (values as short strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> str | None:
    """The source checkout's commit; ``FEDBIP_GIT_COMMIT`` when there is no ``.git`` (e.g. the
    working dir uploaded by ``ray job submit``)."""
    return _git("rev-parse", "HEAD") or os.environ.get("FEDBIP_GIT_COMMIT") or None


def git_dirty() -> bool | None:
    """True when tracked files differ from the commit (None outside a checkout)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def git_tags() -> dict[str, str]:
    """``git_commit`` (+ MLflow's own source tag) and ``git_dirty`` for a run, where known."""
    tags: dict[str, str] = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = tags["git_commit"] = commit
    dirty = git_dirty()
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    return tags


def source_tags(argv: Sequence[str] | None = None,
                environ: dict[str, str] | None = None) -> dict[str, str]:
    """``mlflow.source.name`` and ``command`` (the command line, program name shortened) and
    ``mlflow.source.type``: JOB inside ``ray job submit``, else LOCAL."""
    args = list(sys.argv if argv is None else argv)
    env = os.environ if environ is None else environ
    if args:
        args[0] = Path(args[0]).name
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in env or "RAY_JOB_SUBMISSION_ID" in env
    command = shlex.join(args)[:500] or "fedbip"
    # the UI shows the source name's last path part only: the whole line is tag `command`
    return {"mlflow.source.name": command, "mlflow.source.type": "JOB" if in_job else "LOCAL",
            "command": command}


def run_description(cfg: Config, output: str | Path) -> str:
    """The run's description (``mlflow.note.content``, Markdown)."""
    d, fed = cfg.data, cfg.federation
    return "\n".join([
        f"**{cfg.strategy.name}** federation `{cfg.name}`",
        "",
        f"- model: `{cfg.model.name}` ({cfg.model.task}, {cfg.model.peft.method})",
        f"- dataset: `{d.dataset}`, {d.num_clients} clients, partition `{d.partition.kind}`",
        f"- rounds: {fed.rounds}, clients per round: {cfg.clients_per_round()}",
        f"- output: `{output}`",
    ])


def run_status_for(exc: BaseException) -> str:
    """MLflow status for a run ended by ``exc``: KILLED for interrupts/stops, else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


def byte_totals(history: list[dict[str, Any]]) -> dict[str, float]:
    """Cumulative bytes moved over the rounds in ``history`` (server in = client uploads)."""
    b_in = float(sum(r.get("bytes_in") or 0 for r in history))
    b_out = float(sum(r.get("bytes_out") or 0 for r in history))
    return {"bytes_in_total": b_in, "bytes_out_total": b_out, "bytes_total": b_in + b_out}


def client_quantiles(values: Iterable[float]) -> dict[str, float]:
    """``client_accuracy_{min,p10,p50,p90,max}`` of per-client values (empty: none)."""
    arr = np.asarray([v for v in values if v == v], dtype=np.float64)
    if not arr.size:
        return {}
    qs = np.quantile(arr, [0.0, 0.1, 0.5, 0.9, 1.0])
    return {f"client_accuracy_{name}": float(q) for name, q in zip(QUANTILES, qs, strict=True)}


def row_metrics(row: dict[str, Any], history: list[dict[str, Any]],
                per_client_limit: int = PER_CLIENT_LIMIT) -> dict[str, float]:
    """A metrics.jsonl row as MLflow metrics; ``history`` holds rows 1..row's round (for the
    cumulative byte counts). One metric per client up to ``per_client_limit`` clients, else
    their quantiles (:func:`client_quantiles`). NaN values are left out."""
    values: dict[str, float] = {"round_seconds": row["seconds"], "bytes_in": row["bytes_in"],
                                "bytes_out": row["bytes_out"]}
    values.update({name: len(row[key]) for name, key in ROW_COUNTS.items()})
    values.update({k: float(row[k]) for k in ROW_VALUES if row.get(k) is not None})
    per_client = row.get("per_client_accuracy", {})
    if len(per_client) > per_client_limit:
        values.update(client_quantiles(float(a) for a in per_client.values()))
    else:
        for cid, acc in per_client.items():
            values[f"client_{int(cid):04d}_accuracy"] = float(acc)
        for cid, acc in (row.get("per_client_val_accuracy") or {}).items():
            values[f"client_{int(cid):04d}_val_accuracy"] = float(acc)
    values.update(task_metrics(row))
    values.update({k: float(v) for k, v in row.get("extra", {}).items()})
    values.update(byte_totals(history))
    return {k: float(v) for k, v in values.items() if float(v) == float(v)}


def task_metrics(row: dict[str, Any]) -> dict[str, float]:
    """Per-task scores of a row (causal LMs with tasks): ``task_<name>_score`` (test) and
    ``task_<name>_val_score``, names reduced to MLflow's allowed characters."""
    out: dict[str, float] = {}
    for key, suffix in (("per_task_score", "score"), ("per_task_val_score", "val_score")):
        for task, value in (row.get(key) or {}).items():
            if value is not None:
                out[f"task_{metric_safe(str(task))}_{suffix}"] = float(value)
    return out


def metric_safe(name: str) -> str:
    """``name`` with characters MLflow refuses in metric keys replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def final_metrics(summary: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, float]:
    """``final_*`` metrics of a finished run (summary values and byte totals)."""
    out = {f"final_{k}": float(summary[k]) for k in FINAL_KEYS if summary.get(k) is not None}
    out.update({f"final_{k}": v for k, v in byte_totals(history).items()})
    return out


def changed_params(logged: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    """Params whose value differs from the one a run already holds (MLflow cannot change a
    param; e.g. ``federation.rounds`` when a finished run is extended)."""
    return {k: v for k, v in params.items() if k in logged and logged[k] != v}


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI served at ``base``, in its model-training view (the UI's
    GenAI / model-training switch is a browser setting that overrides the experiment's kind)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def where_to_look(uri: str, experiment_id: str, run_id: str,
                  default_uri: str = "sqlite:///mlflow.db") -> str:
    """What ``fedbip run`` prints at the end: the run's URL on a tracking server, else the local
    store and how to open the dashboard on it."""
    if is_server(uri):
        return f"MLflow run {run_id}: {run_url(uri, experiment_id, run_id)}"
    env = "" if uri == default_uri else f"MLFLOW_BACKEND={shlex.quote(uri)} "
    return (f"MLflow run {run_id} in {uri}: open the dashboard with `{env}{UI_SCRIPT}`, then "
            f"{run_url(UI_URL, experiment_id, run_id)}")


@dataclass
class MetricLedger:
    """The (metric, step) pairs a run holds. MLflow keeps every value ever logged and cannot
    delete one, so a resumed run logs a pair only when the run lacks it: the first value
    logged for a step stays, and every metric ends with one value per step."""

    seen: set[tuple[str, int]] = field(default_factory=set)

    @classmethod
    def from_history(cls, histories: dict[str, Iterable[int]]) -> MetricLedger:
        """From {metric: steps logged so far}."""
        return cls({(k, int(s)) for k, steps in histories.items() for s in steps})

    def fresh(self, values: dict[str, float], step: int) -> dict[str, float]:
        """The part of ``values`` (for ``step``) the run does not hold yet; marks it held."""
        out = {k: v for k, v in values.items() if (k, step) not in self.seen}
        self.seen.update((k, step) for k in out)
        return out

    def steps(self, key: str) -> list[int]:
        return sorted(s for k, s in self.seen if k == key)
