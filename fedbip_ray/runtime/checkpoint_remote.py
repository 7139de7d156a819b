"""Checkpoints on an object store (no rename there): the tensors, ``layout.json`` and
``meta.json`` (with the tensors' SHA-256) are written first, then a manifest, and the small
``latest.json`` pointer last (:func:`fedbip_ray.storage.publish_checkpoint`). Reading follows
the pointer, verifies every object and the tensors' digest, and falls back to the previous
complete checkpoint: an upload that was cut off is never loaded. Same format as on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, BinaryIO

from safetensors.numpy import load as load_safetensors

from fedbip_ray import storage
from fedbip_ray.runtime import checkpoint as ckpt
from fedbip_ray.storage import Location, Published


def publish(root: Location, round_num: int, files: ckpt.TensorFiles,
            layout: Mapping[str, Any], meta: dict[str, Any]) -> Location:
    """Write round ``round_num``'s checkpoint ({file name: tensors}) under ``root``; its
    directory."""
    digest: dict[str, str] = {}

    def writer(name: str) -> Any:
        def write(fh: BinaryIO) -> None:
            digest[name] = ckpt.write_safetensors(fh, files[name])
        return write

    def write_meta(fh: BinaryIO) -> None:  # after the tensors: their digests are known
        fh.write(json.dumps({**meta, "sha256": dict(digest)}).encode())

    return storage.publish_checkpoint(root, round_num, {
        **{name: writer(name) for name in files},
        "layout.json": json.dumps(dict(layout)).encode(),
        "meta.json": write_meta,
    }, keep=ckpt.KEEP)


def _json(pub: Published, name: str) -> Any:
    where = pub.location.describe()
    if name not in pub.files:
        raise ckpt._bad(where, f"{name} missing")
    try:
        return json.loads(pub.files[name])
    except (UnicodeDecodeError, ValueError) as exc:
        raise ckpt._bad(where, f"{name} unreadable ({type(exc).__name__})") from None


def from_published(pub: Published) -> ckpt.Checkpoint:
    """The validated checkpoint of a verified round directory (ConfigError if it is not one)."""
    where = pub.location
    meta = ckpt.check_meta(_json(pub, "meta.json"), where.describe(), pub.round)
    files = {}
    for name in ckpt.checkpoint_files(meta):
        data = pub.files.get(name)
        if data is None:
            raise ckpt._bad(where.describe(), f"{name} missing")
        if hashlib.sha256(data).hexdigest() != (meta.get("sha256") or {}).get(name):
            raise ckpt._bad(where.describe(), f"{name} is corrupt (sha256 mismatch)")
        files[name] = ckpt.load_tensors(lambda d=data: load_safetensors(d), where.describe())
    return ckpt.validated(where, meta, ckpt.merge_tensor_files(files),
                          _json(pub, "layout.json"))


def load(root: Location) -> ckpt.Checkpoint | None:
    """The newest complete checkpoint under ``root`` (None: none yet)."""
    return storage.load_latest(root, from_published)
