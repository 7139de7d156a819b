"""Publishing checkpoints so that a reader only ever loads a complete one.

Layout under a checkpoint root (``OUTPUT/checkpoints``)::

    latest.json                  {"round": R, "path": "round_0000R"}   written last
    round_0000R/<files>          e.g. server.safetensors, layout.json, meta.json (caller's)
    round_0000R/manifest.json    {"format": 1, "round": R, "files": {name: {sha256, size}}}

Local: the round directory is written as ``.tmp_round_0000R``, fsynced and renamed, then the
pointer is replaced atomically. Object store (no rename): the files are written in place, then
the manifest, then the pointer. Reading follows the pointer, checks every file's size and SHA-256
against the manifest and falls back to the newest older complete checkpoint; a round the pointer
has not reached yet is never loaded, and without a pointer there is no checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from fedbip_ray.config import ConfigError
from fedbip_ray.storage.errors import StorageError
from fedbip_ray.storage.location import Location, fsync_dir

FORMAT = 1
KEEP = 2  # complete checkpoints kept
POINTER = "latest.json"
MANIFEST = "manifest.json"
ROUND_DIR = re.compile(r"^round_(\d{5,})$")
TMP_PREFIX = ".tmp_round_"
Writer = Callable[[BinaryIO], object]  # writes one file's bytes to the stream it is given
T = TypeVar("T")
_log = logging.getLogger(__name__)


class CheckpointInvalid(StorageError):
    """A checkpoint directory that is incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Published:
    """A verified checkpoint: its round, its directory and every file's bytes (manifest
    excluded)."""

    round: int
    location: Location
    files: dict[str, bytes]


class HashingWriter:
    """Passes writes to ``inner`` while counting bytes and computing their SHA-256."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner, self.size, self._digest = inner, 0, hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.inner.write(view)
        self._digest.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.inner.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def checkpoint_name(round_num: int) -> str:
    return f"round_{round_num:05d}"


def write_file(target: Location, content: bytes | Writer) -> dict[str, Any]:
    """Write one file (bytes, or a writer called with the stream); its ``{sha256, size}``."""
    with target.open_writer() as fh:
        hashing = HashingWriter(fh)
        if callable(content):
            content(hashing)  # type: ignore[arg-type]
        else:
            hashing.write(content)
    return {"sha256": hashing.hexdigest(), "size": hashing.size}


def write_round(directory: Location, round_num: int, files: Mapping[str, bytes | Writer]) -> None:
    """Every file in order, then the manifest recording their hashes."""
    if MANIFEST in files or POINTER in files:
        raise ValueError(f"{MANIFEST} and {POINTER} are reserved names")
    records = {name: write_file(directory / name, content) for name, content in files.items()}
    manifest = {"format": FORMAT, "round": round_num, "files": records}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def publish_checkpoint(root: Location, round_num: int, files: Mapping[str, bytes | Writer],
                       keep: int = KEEP) -> Location:
    """Write round ``round_num``'s ``files`` under ``root``, move the pointer, prune; its directory.

    ``files`` are written in their order, so a writer may use what an earlier one recorded
    (e.g. ``meta.json`` holding the tensors' digest). A failure leaves the pointer where it was.
    """
    if round_num < 1:
        raise ValueError(f"round must be >= 1, got {round_num}")
    name = checkpoint_name(round_num)
    final = root / name
    if root.is_local:
        _publish_local(root, final, round_num, files)
    else:
        if _pointed_name(root) == name:
            raise ValueError(f"{final.describe()} is the published checkpoint; "
                             "publish a later round")
        final.delete_dir()
        try:
            write_round(final, round_num, files)
        except BaseException:
            _delete_quietly(final)
            raise
    (root / POINTER).write_text(json.dumps({"round": round_num, "path": name}))
    prune_checkpoints(root, keep)
    return final


def _pointed_name(root: Location) -> str | None:
    """The directory the pointer names (None if absent or malformed: it is replaced anyway)."""
    try:
        pointer = read_pointer(root)
    except StorageError:
        return None
    return pointer[1] if pointer else None


def _publish_local(root: Location, final: Location, round_num: int,
                   files: Mapping[str, bytes | Writer]) -> None:
    root.mkdir()
    tmp = root / f"{TMP_PREFIX}{final.name[len('round_'):]}"
    tmp.delete_dir()
    tmp.mkdir()
    try:
        write_round(tmp, round_num, files)
    except BaseException:
        _delete_quietly(tmp)
        raise
    fsync_dir(tmp.local_path)
    final.delete_dir()  # left by a run killed after the rename but before the pointer moved
    os.replace(tmp.path, final.path)
    fsync_dir(root.local_path)


def _delete_quietly(directory: Location) -> None:
    try:
        directory.delete_dir()
    except StorageError:
        pass


# ---------------------------------------------------------------------------- reading
def read_pointer(root: Location) -> tuple[int, str] | None:
    """``(round, directory name)`` from ``latest.json``; None if absent; StorageError if
    malformed."""
    try:
        data = (root / POINTER).read_bytes()
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(data)
    except ValueError:
        raise StorageError(f"checkpoint {root.describe()}: {POINTER} is malformed") from None
    if not (isinstance(raw, dict) and isinstance(raw.get("round"), int)
            and isinstance(raw.get("path"), str) and ROUND_DIR.match(raw["path"])
            and int(ROUND_DIR.match(raw["path"]).group(1)) == raw["round"]):  # type: ignore[union-attr]
        raise StorageError(f"checkpoint {root.describe()}: {POINTER} is malformed")
    return raw["round"], raw["path"]


def round_dirs(root: Location) -> list[int]:
    """Rounds that have a ``round_*`` directory under ``root``, ascending (complete or not)."""
    found = (ROUND_DIR.match(n) for n in root.listdir())
    return sorted(int(m.group(1)) for m in found if m)


def read_published(directory: Location, round_num: int) -> Published:
    """Load one round directory, checking every file against its manifest
    (:class:`CheckpointInvalid` if one does not match; ``StorageError`` if the store fails)."""
    where = f"checkpoint {directory.describe()}"
    try:
        data = (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        if directory.is_local and (directory / "meta.json").exists():
            return _read_unmanifested(directory, round_num)
        raise CheckpointInvalid(f"{where}: incomplete ({MANIFEST} missing)") from None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise CheckpointInvalid(f"{where}: {MANIFEST} is malformed") from None
    if not isinstance(manifest, dict):
        manifest = {}
    records = manifest.get("files")
    if manifest.get("format") != FORMAT or manifest.get("round") != round_num \
            or not isinstance(records, dict):
        raise CheckpointInvalid(f"{where}: {MANIFEST} is not a format-{FORMAT} manifest of round "
                                f"{round_num}")
    files = {name: _verified(directory / name, rec, where) for name, rec in records.items()}
    return Published(round_num, directory, files)


def _verified(obj: Location, record: Any, where: str) -> bytes:
    try:
        data = obj.read_bytes()
    except FileNotFoundError:
        raise CheckpointInvalid(f"{where}: {obj.name} missing") from None
    if not isinstance(record, dict) or len(data) != record.get("size") \
            or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointInvalid(f"{where}: {obj.name} is truncated or corrupt (size or sha256 "
                                "mismatch)")
    return data


def _read_unmanifested(directory: Location, round_num: int) -> Published:
    """A local checkpoint written before manifests existed (renamed into place, so complete);
    the caller checks its own digests (meta.json)."""
    names = [n for n in directory.listdir() if not n.startswith(".")]
    return Published(round_num, directory, {n: (directory / n).read_bytes() for n in names})


def load_latest(root: Location, load: Callable[[Published], T],
                warn: Callable[[str], None] = _log.warning) -> T | None:
    """``load(published)`` for the checkpoint the pointer names, else for the newest older
    complete one; None if there is none.

    A checkpoint that fails its manifest, or that ``load`` rejects with ``ConfigError`` or
    ``ValueError``, is reported through ``warn`` and the next older one is tried. A store that
    cannot be read raises ``StorageError`` (a resume must not silently start over).
    """
    pointer = read_pointer(root)
    if pointer is None:
        return None
    newest = pointer[0]
    for rnd in [newest, *(r for r in reversed(round_dirs(root)) if r < newest)]:
        try:
            published = read_published(root / checkpoint_name(rnd), rnd)
        except CheckpointInvalid as exc:
            warn(f"{exc}; trying an older checkpoint")
            continue
        try:
            return load(published)
        except (ConfigError, ValueError) as exc:
            warn(f"{exc}; trying an older checkpoint")
    return None


def read_latest(root: Location, warn: Callable[[str], None] = _log.warning) -> Published | None:
    """The newest complete, verified checkpoint the pointer allows (see :func:`load_latest`)."""
    return load_latest(root, lambda published: published, warn)


# ---------------------------------------------------------------------------- pruning
def prune_checkpoints(root: Location, keep: int = KEEP) -> None:
    """Keep the pointer's round and the newest ``keep`` rounds up to it (it included); delete
    the rest: older rounds, rounds past the pointer (never published) and temporaries."""
    pointer = read_pointer(root)
    newest = pointer[0] if pointer else 0
    older = [r for r in round_dirs(root) if r <= newest]
    kept = {newest, *older[-keep:]} if keep > 0 else {newest}
    for rnd in round_dirs(root):
        if rnd not in kept:
            (root / checkpoint_name(rnd)).delete_dir()
    for name in root.listdir():
        if name.startswith(TMP_PREFIX):
            (root / name).delete_dir()


def clear_checkpoints(root: Location) -> None:
    """Forget every checkpoint under ``root`` (pointer first, then the directories)."""
    (root / POINTER).delete()
    prune_checkpoints(root, keep=0)
