"""Run outputs at a local path or a storage URI (pyarrow.fs; no Ray import).

One API for a local directory, ``file://``, ``s3://bucket/prefix``, ``gs://bucket/prefix`` and
``hdfs://host:port/path``::

    from fedbip_ray import storage

    out = storage.probe(args.output)          # open + write/read/delete a probe object, or
                                              # StorageError (a ConfigError: exit 2, one line)
    with storage.run_lock(out) as lock:       # one run per location (fcntl locally,
                                              # .owner.json with a lease on object stores)
        (out / "config.yaml").write_text(text)          # all-or-nothing replace
        metrics = storage.open_rows(out, "metrics")     # metrics.jsonl | metrics/000001.json...
        ck = storage.load_latest(out / "checkpoints", to_checkpoint)  # or read_latest(...)
        metrics.replace(ck.history if ck else [])       # rows 1..R of the checkpoint
        for rnd in rounds:
            ...
            metrics.append(row)
            storage.publish_checkpoint(out / "checkpoints", rnd, {
                "server.safetensors": lambda fh: write_safetensors(fh, tensors),
                "layout.json": layout_bytes,
                "meta.json": lambda fh: fh.write(meta_bytes()),   # runs after the tensors
            })
            lock.refresh()                    # renews the lease; OwnershipLost if taken over
        metrics.consolidate()                 # object store: also write metrics.jsonl
        (out / "summary.json").write_text(summary)

Where today's code takes a ``Path``: ``output_lock(out)`` -> ``run_lock(loc)``;
``append_line(out / "metrics.jsonl", row)`` -> ``open_rows(loc, "metrics").append(row)``;
rewriting the jsonl files on resume -> ``RowLog.replace(history)`` / ``truncate_after(R)``;
``write_text_atomic(out / name, text)`` -> ``(loc / name).write_text(text)``;
``checkpoint.write_checkpoint`` / ``read_latest`` / ``clear`` -> ``publish_checkpoint`` /
``load_latest`` (``load`` turns the verified ``Published.files`` bytes into a Checkpoint and
raises ConfigError to fall back) / ``clear_checkpoints``.

Credentials come only from the provider's standard chain (AWS: environment, profile, role;
the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``); a URI holding credentials is
refused, and ``Location.describe()`` and every error message are credential-free. A Location
pickles (for Ray tasks) as its filesystem options, never credentials: each process resolves
its own (give remote workers the same AWS_* variables, e.g. through the job's runtime_env).
"""

from fedbip_ray.storage.errors import StorageError
from fedbip_ray.storage.location import Location, open_location, provider_env
from fedbip_ray.storage.lock import LEASE_S, OwnershipLost, RunLock, acquire, run_lock
from fedbip_ray.storage.probing import PROBE_TIMEOUT_S, probe
from fedbip_ray.storage.publish import (
    CheckpointInvalid,
    Published,
    checkpoint_name,
    clear_checkpoints,
    load_latest,
    prune_checkpoints,
    publish_checkpoint,
    read_latest,
    read_pointer,
    read_published,
)
from fedbip_ray.storage.rows import RowLog, open_rows

__all__ = [
    "CheckpointInvalid", "LEASE_S", "PROBE_TIMEOUT_S", "Location", "OwnershipLost", "Published",
    "RowLog", "RunLock", "StorageError",
    "acquire", "checkpoint_name", "clear_checkpoints", "load_latest", "open_location", "open_rows",
    "probe",
    "provider_env",
    "prune_checkpoints", "publish_checkpoint", "read_latest", "read_pointer", "read_published",
    "run_lock",
]
