"""A run's output directory: the lock, ``config.yaml``, ``metrics.jsonl``,
``similarity.jsonl`` and ``summary.json`` (checkpoints: :mod:`fedbip_ray.runtime.checkpoint`)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from fedbip_ray.config import ConfigError
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.runtime.rows import Row

METRICS, SIMILARITY, SUMMARY, CONFIG = "metrics.jsonl", "similarity.jsonl", "summary.json", "config.yaml"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on an output directory (released even if the process is killed)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = (out / ".lock").open("w")
    except OSError as exc:
        raise ConfigError(f"output directory {out}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"output {out}: another fedbip run is using this directory") from None
        yield
    finally:
        fh.close()


def append_line(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync it."""
    with path.open("a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSON lines of ``path`` (a torn last line from a killed run is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_config(out: Path, config: dict[str, Any]) -> None:
    """``config.yaml``: the resolved config."""
    ckpt_io.write_text_atomic(out / CONFIG, yaml.safe_dump(config, sort_keys=False))


def prepare(out: Path, history: list[Row], upto: int, fresh: bool) -> None:
    """metrics.jsonl / similarity.jsonl hold exactly rounds 1..``upto`` of the checkpoint
    (none for a fresh run): rows written after the last checkpoint by a killed run are
    dropped; a fresh run also clears old checkpoints."""
    ckpt_io.write_text_atomic(out / METRICS, _jsonl(history))
    sim = [r for r in read_rows(out / SIMILARITY) if r.get("round", upto + 1) <= upto]
    ckpt_io.write_text_atomic(out / SIMILARITY, _jsonl(sim))
    (out / SUMMARY).unlink(missing_ok=True)
    if fresh:
        ckpt_io.clear(out / "checkpoints")


def record_round(out: Path, row: Row, report: AggregationReport) -> None:
    """Append the round's metrics row and, when the strategy has one, its similarity and
    weight matrices (clients x clients over ``report.accepted``)."""
    append_line(out / METRICS, row)
    if report.similarity is not None:
        append_line(out / SIMILARITY, {
            "round": report.round, "clients": report.accepted,
            "similarity": report.similarity.tolist(),
            "weights": report.weights.tolist() if report.weights is not None else None})


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    ckpt_io.write_text_atomic(out / SUMMARY, json.dumps(summary, indent=1))
