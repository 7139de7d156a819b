"""A run's outputs at a local directory or a storage URI (:mod:`fedbip_ray.storage`):
``config.yaml``, ``metrics.jsonl``, ``similarity.jsonl``, ``summary.json``, ``shards/`` and
``checkpoints/`` (written by :mod:`fedbip_ray.runtime.checkpoint`) and ``similarity/`` (one
compressed ``round_XXXXX.npz`` per aggregated round with ``clients``, ``similarity`` and
``weights`` float32, written by the server actor; ``similarity.jsonl`` holds the same rows only
for rounds of up to ``FULL_MATRIX_MAX`` participants).

A local output is written exactly as always. For a URI the driver also keeps a local working
copy (``RunOutputs.local``: shards, config, metrics, summary; never checkpoints), because the
shards are read back to start the actors and observers such as MLflow log local files; on the
store, metrics and similarity rows are one object per round (no rewrite of a growing file),
consolidated into ``metrics.jsonl`` / ``similarity.jsonl`` at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedbip_ray import storage
from fedbip_ray.config import ConfigError
from fedbip_ray.runtime import checkpoint as ckpt_io
from fedbip_ray.runtime.messages import AggregationReport
from fedbip_ray.runtime.rows import Row
from fedbip_ray.storage import Location, RowLog

METRICS, SIMILARITY, SUMMARY, CONFIG = "metrics", "similarity", "summary.json", "config.yaml"
MATRICES = "similarity"  # folder of round_XXXXX.npz
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of `ray job submit`


@dataclass(frozen=True)
class RoundMatrices:
    """One round's matrices over ``clients`` (N_t,) int64: ``similarity`` (N_t, N_t) float32
    (None when the strategy has none) and ``weights`` (N_t, N_t) float32."""

    round: int
    clients: np.ndarray
    similarity: np.ndarray | None
    weights: np.ndarray


def matrices_name(round_num: int) -> str:
    """``similarity/round_XXXXX.npz``: round ``round_num``'s file, relative to the output."""
    return f"{MATRICES}/round_{round_num:05d}.npz"


def write_round_matrices(output: Location, round_num: int, clients: list[int],
                         similarity: np.ndarray | None, weights: np.ndarray) -> str:
    """Write round ``round_num``'s (N_t, N_t) matrices over ``clients`` as one compressed
    npz (float32) at ``output``; returns its name relative to ``output``."""
    arrays = {"clients": np.asarray(clients, dtype=np.int64),
              "weights": np.asarray(weights, dtype=np.float32)}
    if similarity is not None:
        arrays["similarity"] = np.asarray(similarity, dtype=np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    name = matrices_name(round_num)
    (output / name).write_bytes(buf.getvalue())
    return name


def read_round_matrices(output: Location | str | os.PathLike[str],
                        round_num: int) -> RoundMatrices:
    """Round ``round_num``'s matrices from the run at ``output`` (a path, URI or Location);
    StorageError when the round has no file."""
    data = storage.open_location(output) / matrices_name(round_num)
    with np.load(io.BytesIO(data.read_bytes()), allow_pickle=False) as npz:
        sim = npz["similarity"] if "similarity" in npz.files else None
        return RoundMatrices(round_num, npz["clients"], sim, npz["weights"])


def drop_matrices_after(output: Location, round_num: int) -> None:
    """Delete the ``similarity/round_XXXXX.npz`` files of rounds after ``round_num``."""
    folder = output / MATRICES
    if not folder.exists():
        return
    for name in folder.listdir():
        stem = name.removeprefix("round_").removesuffix(".npz")
        if stem.isdigit() and int(stem) > round_num:
            (folder / name).delete(quiet=True)


def is_uri(target: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain path."""
    return "://" in str(target)


def check_job_output(target: str | os.PathLike[str]) -> None:
    """Under ``ray job submit`` the driver's working directory is a temporary copy: a
    relative output would vanish with it (ConfigError, one line)."""
    if os.environ.get(JOB_ENV) and not is_uri(target) and not Path(target).is_absolute():
        raise ConfigError(f"--output {target}: relative paths land in the job's temporary working "
                          "directory under `ray job submit`; give an absolute path on shared "
                          "storage or a URI (s3://bucket/prefix, gs://..., hdfs://..., file:///...)")


def mirror_dir(loc: Location) -> Path:
    """The local working copy of a remote output (stable per URI on this machine)."""
    digest = hashlib.sha256(loc.describe().encode()).hexdigest()[:16]
    root = Path(os.environ.get("FEDBIP_CACHE_DIR", Path.home() / ".cache" / "fedbip_ray"))
    path = root / "runs" / digest
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.mkdtemp(prefix="fedbip-run-"))
    return path


def local_side(target: str | os.PathLike[str]) -> Path:
    """The local directory holding a run's shards, config and metrics: the output itself, or
    the working copy of a storage URI."""
    if not is_uri(target):
        return Path(target)
    loc = storage.open_location(target)
    return loc.local_path if loc.is_local else mirror_dir(loc)


def fetch_config(uri: str) -> Path | None:
    """The ``config.yaml`` of the run at storage ``uri``, copied into its local side (None
    when the run has none)."""
    try:
        data = (storage.open_location(uri) / CONFIG).read_bytes()
    except FileNotFoundError:
        return None
    local = local_side(uri)
    local.mkdir(parents=True, exist_ok=True)
    (local / CONFIG).write_bytes(data)
    return local / CONFIG


def fetch_run(target: str | os.PathLike[str]) -> Path:
    """A finished run's local side: the directory itself, or for a storage URI its
    ``config.yaml`` and ``shards/`` copied into the local working copy (checkpoints stay on the
    store and are read from there). ConfigError (one line) when the URI holds no run."""
    local = local_side(target)
    if not is_uri(target):
        return local
    loc = storage.open_location(target)
    if fetch_config(str(target)) is None:
        raise ConfigError(f"{loc.describe()}: not a run (no {CONFIG})")
    (local / "shards").mkdir(parents=True, exist_ok=True)
    for name in (loc / "shards").listdir():
        (local / "shards" / name).write_bytes((loc / "shards" / name).read_bytes())
    return local


@dataclass
class RunOutputs:
    """Where a run writes: ``location`` (its output) and ``local`` (a local directory: the
    output itself when local, else the working copy)."""

    location: Location
    local: Path
    # the row logs by name, opened once (an object-store log numbers its rows on first use)
    _rows: dict[str, list[RowLog]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, target: str | os.PathLike[str]) -> RunOutputs:
        """Open (and for a URI probe with a small write) the output; StorageError if unusable."""
        check_job_output(target)
        if not is_uri(target):
            loc = storage.open_location(target)
            return cls(loc, loc.local_path)
        loc = storage.probe(target)
        return cls(loc, local_side(target))

    @property
    def remote(self) -> bool:
        return not self.location.is_local

    @property
    def checkpoints(self) -> Location:
        return self.location / "checkpoints"

    def _logs(self, name: str) -> list[RowLog]:
        """The local log ``name`` and, for a remote output, its object-store twin."""
        if name not in self._rows:
            local = storage.open_rows(storage.open_location(self.local), name)
            self._rows[name] = ([local, storage.open_rows(self.location, name)] if self.remote
                                else [local])
        return self._rows[name]

    def write_config(self, config: dict[str, Any]) -> None:
        """``config.yaml``: the resolved config."""
        self._write(CONFIG, yaml.safe_dump(config, sort_keys=False))

    def _write(self, name: str, text: str) -> None:
        storage.open_location(self.local / name).write_text(text)
        if self.remote:
            (self.location / name).write_text(text)

    def publish_shards(self, directory: Path) -> None:
        """Copy the run's shard files (built locally) to a remote output, once."""
        if not self.remote:
            return
        target = self.location / "shards"
        present = set(target.listdir()) if target.exists() else set()
        for path in sorted(directory.iterdir()):
            if path.is_file() and (path.name not in present or path.name == "clients.json"):
                (target / path.name).write_bytes(path.read_bytes())

    def prepare(self, history: list[Row], upto: int, fresh: bool) -> None:
        """metrics / similarity (rows and ``similarity/`` files) hold exactly rounds
        1..``upto`` of the checkpoint (none for a fresh run): what a killed run wrote after
        its last checkpoint is dropped; a fresh run also clears old checkpoints."""
        for log in self._logs(METRICS):
            log.replace(history)
        for log in self._logs(SIMILARITY):
            log.truncate_after(upto)
        drop_matrices_after(self.location, upto)
        for loc in self._summaries():
            loc.delete(quiet=True)
        if fresh:
            ckpt_io.clear(self.checkpoints)

    def _summaries(self) -> list[Location]:
        local = storage.open_location(self.local / SUMMARY)
        return [local, self.location / SUMMARY] if self.remote else [local]

    def record_round(self, row: Row, report: AggregationReport) -> None:
        """Append the round's metrics row and, when the report holds them (a strategy with a
        similarity, up to ``FULL_MATRIX_MAX`` participants), its similarity and weight
        matrices (clients x clients over ``report.accepted``) to ``similarity.jsonl``; larger
        rounds are in ``similarity/`` only (written by the server)."""
        for log in self._logs(METRICS):
            log.append(row)
        if report.similarity is None:
            return
        sim = {"round": report.round, "clients": report.accepted,
               "similarity": report.similarity.tolist(),
               "weights": report.weights.tolist() if report.weights is not None else None}
        for log in self._logs(SIMILARITY):
            log.append(sim)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``; on a remote output also the consolidated jsonl files."""
        if self.remote:
            for name in (METRICS, SIMILARITY):
                storage.open_rows(self.location, name).consolidate()
        self._write(SUMMARY, json.dumps(summary, indent=1))

