"""MLflow for every run: params, per-round metrics, matrices, heatmaps, plots, adapters.

Embedded default: a local sqlite store ``sqlite:///mlflow.db`` in the working directory.
``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point to a server instead.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from fedbip_ray.config import Config, ConfigError
from fedbip_ray.runtime.messages import AggregationReport

DEFAULT_URI = "sqlite:///mlflow.db"
HEATMAP_EVERY = 5
log = logging.getLogger("fedbip.mlflow")


def tracking_uri(cfg: Config) -> str:
    """Config first, then ``MLFLOW_TRACKING_URI``, then the local sqlite store."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def probe_tracking(uri: str, timeout_s: float = 3.0) -> None:
    """ConfigError (one line) when an http(s) tracking server does not answer within
    ``timeout_s`` (MLflow's client would retry for minutes); local stores are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http(s) only
            resp.read(64)
    except urllib.error.HTTPError:
        return  # something answers (a proxy or an older server without /health)
    except (OSError, ValueError) as exc:
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


def run_status_for(exc: BaseException) -> str:
    """MLflow status for a run ended by ``exc``: KILLED for interrupts/stops, else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


def byte_totals(history: list[dict[str, Any]]) -> dict[str, float]:
    """Cumulative bytes moved over the rounds in ``history`` (server in = client uploads)."""
    b_in = float(sum(r.get("bytes_in") or 0 for r in history))
    b_out = float(sum(r.get("bytes_out") or 0 for r in history))
    return {"bytes_in_total": b_in, "bytes_out_total": b_out, "bytes_total": b_in + b_out}


def heatmap_png(matrix: np.ndarray, labels: list[int], title: str, path: Path) -> None:
    """Write an (N, N) matrix as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.4 * n))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(n), [str(c) for c in labels], fontsize=7)
    ax.set_yticks(range(n), [str(c) for c in labels], fontsize=7)
    ax.set_xlabel("client k")
    ax.set_ylabel("client i")
    ax.set_title(title, fontsize=9)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_plot(history: list[dict[str, Any]], path: Path) -> None:
    """Mean / worst-10% / per-client test accuracy per round as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r.get("mean_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        rounds = [r["round"] for r in rows]
        for cid in rows[-1]["per_client_accuracy"]:
            ax.plot(rounds, [r["per_client_accuracy"].get(cid) for r in rows], color="0.8", lw=0.8)
        ax.plot(rounds, [r["mean_accuracy"] for r in rows], label="mean", lw=2)
        ax.plot(rounds, [r["worst10_accuracy"] for r in rows], label="worst 10%", lw=2)
        ax.legend()
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class MlflowCallback:
    """Run callback that mirrors a federation into one MLflow run."""

    def __init__(self, cfg: Config, parent_run_id: str | None = None, log_adapters: bool = True) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.log_adapters = log_adapters
        self.run_id: str | None = None
        self.client: Any = None
        self.status: str | None = None  # terminal status once set (FINISHED/FAILED/KILLED)
        probe_tracking(tracking_uri(cfg))

    def on_start(self, run: Any) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.cfg)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.cfg.tracking.experiment)
        tags = {"strategy": self.cfg.strategy.name, "mlflow.runName": self.cfg.name,
                "output_dir": str(run.output), **git_tags()}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        self.run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        params = flatten(self.cfg.to_dict())
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        self.client.log_artifact(self.run_id, str(run.output / "config.yaml"))
        self.client.log_artifact(self.run_id, str(run.output / "shards" / "clients.json"), "data")

    def on_round(self, run: Any, row: dict[str, Any], report: AggregationReport) -> None:
        from mlflow.entities import Metric

        step, ts = int(row["round"]), int(__import__("time").time() * 1000)
        values: dict[str, float] = {
            "round_seconds": row["seconds"], "bytes_in": row["bytes_in"], "bytes_out": row["bytes_out"],
            "clients_accepted": len(row["accepted"]), "clients_failed": len(row["failed"]),
            "clients_rejected": len(row["rejected"]), "stragglers": len(row["stragglers"]),
        }
        for key in ("mean_accuracy", "std_accuracy", "worst10_accuracy", "mean_val_accuracy",
                    "test_loss", "train_loss"):
            if row.get(key) is not None:
                values[key] = float(row[key])
        for cid, acc in row.get("per_client_accuracy", {}).items():
            values[f"client_{int(cid):04d}_accuracy"] = float(acc)
        for key, v in row.get("extra", {}).items():
            values[key] = float(v)
        values.update(byte_totals(run.history))
        metrics = [Metric(k, float(v), ts, step) for k, v in values.items() if v == v]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])
        if report.similarity is not None:
            last = step == run.cfg.federation.rounds
            self._log_matrices(step, report, png=last or step % HEATMAP_EVERY == 0 or step == 1)

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

    def on_end(self, run: Any, summary: dict[str, Any]) -> None:
        import ray

        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            accuracy_plot(run.history, d / "accuracy_per_round.png")
            self.client.log_artifact(self.run_id, str(d / "accuracy_per_round.png"), "plots")
        self.client.log_artifact(self.run_id, str(run.output / "summary.json"))
        self.client.log_artifact(self.run_id, str(run.output / "metrics.jsonl"))
        if self.log_adapters:
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
        for key in ("mean_accuracy", "worst10_accuracy", "mean_val_accuracy", "wall_seconds"):
            if summary.get(key) is not None:
                self.client.log_metric(self.run_id, f"final_{key}", float(summary[key]))
        for key, value in byte_totals(run.history).items():
            self.client.log_metric(self.run_id, f"final_{key}", value)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.status = "FINISHED"

    def on_error(self, run: Any, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for an interrupt or a Tune stop) with the error as a tag
        and ``error.txt``; idempotent, and never raises (the original error matters more)."""
        if self.run_id is None or self.client is None or self.status is not None:
            return
        import traceback

        status = run_status_for(exc)
        try:
            if isinstance(exc, SystemExit):  # how Ray Tune stops a trial (e.g. ASHA)
                self.client.set_tag(self.run_id, "stopped", "SystemExit (e.g. stopped by a Ray Tune scheduler)")
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
