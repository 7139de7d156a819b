"""``probe``: prove that a location can be written, read and cleaned up before a run starts."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import pyarrow.fs as pafs

from fedbip_ray.storage.errors import StorageError, cause
from fedbip_ray.storage.location import Location, open_location, s3_filesystem

PROBE_TIMEOUT_S = 10.0  # seconds without data before the probe gives up on an S3 request


def probe(target: str | os.PathLike[str] | Location) -> Location:
    """Write, read back and delete a small probe object under ``target``; return its Location.

    Any failure (unknown scheme, unreachable or silent endpoint, missing bucket, denied write,
    a file in the way) raises :class:`StorageError` with one line naming the location and the
    cause. On S3 each request is tried once with ``PROBE_TIMEOUT_S`` without data: a silent
    endpoint fails in that plus a few seconds (measured: 17 s), a refused one at once.
    """
    loc = open_location(target)
    if loc.is_local and os.path.isfile(loc.path):
        raise StorageError(f"{loc.describe()}: is a file, not a directory")
    token = uuid.uuid4().hex
    obj = _impatient(loc) / f".fedbip-probe-{token}"
    payload = f"fedbip probe {token}\n".encode()
    try:
        loc.mkdir()
        obj.write_bytes(payload)
    except StorageError as exc:
        raise StorageError(f"{loc.describe()}: cannot be written{_at(loc)} "
                           f"({_reason(str(exc))})") from None
    try:
        back = obj.read_bytes()
    except (StorageError, FileNotFoundError) as exc:
        obj.delete(quiet=True)
        raise StorageError(f"{loc.describe()}: a probe object written there cannot be read back "
                           f"({cause(exc)})") from None
    _remove(obj)
    if back != payload:
        raise StorageError(f"{loc.describe()}: a probe object read back different bytes")
    return loc


def _impatient(loc: Location) -> Location:
    """``loc`` with one short try per request on S3 (a run's client retries and waits longer)."""
    if not isinstance(loc.filesystem, pafs.S3FileSystem):
        return loc
    bucket = loc.path.split("/", 1)[0]
    filesystem, _ = s3_filesystem(bucket, PROBE_TIMEOUT_S, max_attempts=1)
    return replace(loc, filesystem=filesystem)


def _at(loc: Location) -> str:
    return f" at endpoint {loc.endpoint}" if loc.endpoint else ""


def _reason(message: str) -> str:
    """The cause in parentheses at the end of a ``storage_error`` message."""
    if message.endswith(")") and " (" in message:
        return message[message.index(" (") + 2:-1]
    return message


def _remove(obj: Location) -> None:
    try:
        obj.delete()
    except (StorageError, OSError) as exc:  # a store that lets us write but not delete
        raise StorageError(f"{obj.describe()}: cannot delete the probe object "
                           f"({cause(exc)})") from None
