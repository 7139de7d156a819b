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
        metrics.truncate_after(resumed_round)           # on --resume
        ck = storage.read_latest(out / "checkpoints")   # Published(round, location, files) | None
        for rnd in rounds:
            ...
            metrics.append(row)
            storage.publish_checkpoint(out / "checkpoints", rnd, {
                "server.safetensors": lambda fh: write_safetensors(fh, tensors),
                "layout.json": layout_bytes,
                "meta.json": lambda fh: fh.write(meta_bytes()),
            })
            lock.refresh()                    # renews the lease; raises if another run took over
        metrics.consolidate()                 # object store: also write metrics.jsonl
        (out / "summary.json").write_text(summary)

Credentials come only from the provider's standard chain (AWS: environment, profile, role;
the endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``); a URI holding credentials is
refused, and ``Location.describe()`` and every error message are credential-free. A Location
pickles (for Ray tasks) as its filesystem options: each process uses its own credentials.
"""

from fedbip_ray.storage.errors import StorageError
from fedbip_ray.storage.location import Location, open_location
from fedbip_ray.storage.lock import LEASE_S, OwnershipLost, RunLock, acquire, run_lock
from fedbip_ray.storage.probe import probe
from fedbip_ray.storage.publish import (
    Published,
    checkpoint_name,
    clear_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    read_latest,
    read_pointer,
    read_published,
)
from fedbip_ray.storage.rows import RowLog, open_rows

__all__ = [
    "LEASE_S", "Location", "OwnershipLost", "Published", "RowLog", "RunLock", "StorageError",
    "acquire", "checkpoint_name", "clear_checkpoints", "open_location", "open_rows", "probe",
    "prune_checkpoints", "publish_checkpoint", "read_latest", "read_pointer", "read_published",
    "run_lock",
]
