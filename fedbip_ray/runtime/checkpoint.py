"""Per-round checkpoints: safetensors + JSON (never pickle), written atomically.

Layout of ``OUTPUT/checkpoints/``::

    latest.json                 {"round": R, "path": "round_0000R"}   (replaced atomically)
    round_0000R/server.safetensors  states (N, D) f32, init (D,) f32, similarity (N, N) f64
    round_0000R/server_shard_KKKK.safetensors  a sharded server's blocks: states (N, D_k),
                                init (D_k,) each (server.safetensors then holds the rest)
    round_0000R/layout.json     the adapter layout (names, shapes, offsets)
    round_0000R/meta.json       format, round, history (metrics rows 1..R), config, sha256,
                                extra (run metadata, e.g. the MLflow run id)

A checkpoint directory is written under a temporary name, fsynced, then renamed; only then is
``latest.json`` replaced. A process killed at any moment leaves ``latest.json`` pointing at a
complete checkpoint (or absent). Reading validates everything and raises :class:`ConfigError`
with one line naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from fedbip_ray.config import ConfigError
from fedbip_ray.core.taskvector import Layout
from fedbip_ray.storage import Location, clear_checkpoints
from fedbip_ray.storage.location import fsync_dir

Root = Path | Location  # a checkpoint root: a local directory, or a Location (maybe remote)

log = logging.getLogger("fedbip.checkpoint")
FORMAT = 1
KEEP = 2  # complete checkpoints kept on disk
TENSORS = "server.safetensors"
_NAME = re.compile(r"^round_(\d{5,})$")
_SHARD = re.compile(r"^server_shard_(\d{3,})\.safetensors$")
# Config sections that must not change on resume (they define the data, the model and the
# trajectory); others (rounds, deadlines, resources, tracking) may.
FROZEN_ON_RESUME: tuple[str, ...] = (
    "seed", "model", "data", "train", "strategy", "privacy",
    "federation.clients_per_round", "federation.fraction", "federation.updates",
)
# ... except these, checked on their own (data.joined may only grow: runtime/joined.py)
THAWED_ON_RESUME: tuple[str, ...] = ("data.joined",)


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: ``tensors`` as written by the server, ``history`` rows 1..round."""

    path: Path | Location
    round: int
    tensors: dict[str, np.ndarray]
    layout: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # run metadata saved with the state

    @property
    def num_clients(self) -> int:
        return int(self.tensors["states"].shape[0])


# ---------------------------------------------------------------------------- atomic files
def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- writing
def checkpoint_name(round_num: int) -> str:
    return f"round_{round_num:05d}"


_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64",
                       "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(fh: Any, tensors: Mapping[str, np.ndarray]) -> str:
    """Write ``tensors`` to the open binary file ``fh`` in the safetensors format, streaming
    each array's bytes (no serialized copy in memory); returns the file's sha256 (hex)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    header: dict[str, Any] = {}
    offset = 0
    for name, arr in arrays.items():
        dtype = _SAFETENSORS_DTYPES.get(arr.dtype.name)
        if dtype is None or arr.dtype.byteorder == ">":
            raise ValueError(f"checkpoint tensor {name!r}: dtype {arr.dtype} is not supported")
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    for chunk in (len(text).to_bytes(8, "little"), text,
                  *(memoryview(a.reshape(-1)).cast("B") for a in arrays.values() if a.size)):
        fh.write(chunk)
        digest.update(chunk)
    return digest.hexdigest()


TensorFiles = Mapping[str, Mapping[str, np.ndarray]]  # file name -> its tensors


def tensor_files(tensors: Mapping[str, Any]) -> dict[str, Mapping[str, np.ndarray]]:
    """``tensors`` as {file name: tensors}: one ``server.safetensors`` for a server's
    tensors, or the files of a sharded server as they are."""
    if tensors and all(isinstance(v, Mapping) for v in tensors.values()):
        return dict(tensors)
    return {TENSORS: tensors}


def merge_tensor_files(files: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One server's tensors from a checkpoint's files: the shards' ``states`` and ``init``
    joined along the columns in shard order."""
    shards = sorted((f for f in files if _SHARD.match(f)), key=lambda f: int(_SHARD.match(f)[1]))
    out = dict(files.get(TENSORS, {}))
    if shards:
        out["states"] = np.concatenate([files[f]["states"] for f in shards], axis=1)
        out["init"] = np.concatenate([files[f]["init"] for f in shards])
    return out


def _write_files(directory: Path, files: TensorFiles) -> dict[str, str]:
    """Each file's tensors, fsynced, written in parallel; their sha256 by name."""
    def one(name: str) -> str:
        with (directory / name).open("wb") as fh:
            digest = write_safetensors(fh, files[name])
            fh.flush()
            os.fsync(fh.fileno())
        return digest

    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        return dict(zip(files, pool.map(one, files), strict=True))


def write_checkpoint(root: Root, round_num: int, tensors: Mapping[str, Any],
                     layout: Mapping[str, Any], history: list[dict[str, Any]],
                     config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Any:
    """Write round ``round_num``'s checkpoint under ``root`` atomically; prune old ones.
    ``tensors``: a server's tensors, or {file name: tensors} (a sharded server's files).
    Returns its directory (a Path, or a Location on an object store)."""
    files = tensor_files(tensors)
    meta = {"format": FORMAT, "round": round_num, "history": history, "config": dict(config),
            "extra": dict(extra or {}),
            "rng": "stateless: sampling, training and DP noise are seeded by (seed, round, client)"}
    if isinstance(root, Location):
        if not root.is_local:
            from fedbip_ray.runtime.checkpoint_remote import publish  # (imports this module)

            return publish(root, round_num, files, layout, meta)
        root = root.local_path
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(round_num)
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta["sha256"] = _write_files(tmp, files)
    write_text_atomic(tmp / "layout.json", json.dumps(dict(layout)))
    write_text_atomic(tmp / "meta.json", json.dumps(meta))
    fsync_dir(tmp)
    if final.exists():  # left by a run killed after the rename but before latest.json moved
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / "latest.json", json.dumps({"round": round_num, "path": final.name}))
    prune(root, keep={final.name, *(p.name for p in _complete(root)[-KEEP:])})
    return final


def _complete(root: Path) -> list[Path]:
    """Checkpoint directories by round (no temporaries)."""
    found = [p for p in root.glob("round_*") if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def prune(root: Path, keep: Iterable[str]) -> None:
    """Remove checkpoint directories and temporaries not named in ``keep``."""
    keep = set(keep)
    for p in [*root.glob("round_*"), *root.glob(".tmp_round_*")]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def clear(root: Root) -> None:
    """Forget every checkpoint under ``root`` (a fresh run in an old output directory)."""
    if isinstance(root, Location):
        if not root.is_local:
            clear_checkpoints(root)
            return
        root = root.local_path
    (root / "latest.json").unlink(missing_ok=True)
    prune(root, keep=())


# ---------------------------------------------------------------------------- reading
def _bad(root: Any, why: str) -> ConfigError:
    return ConfigError(f"checkpoint {root}: {why}")


def _read_json(path: Path, root: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise _bad(root, f"{path.name} missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(root, f"{path.name} unreadable ({type(exc).__name__})") from None


def read_latest(root: Root) -> Checkpoint | None:
    """The checkpoint ``root/latest.json`` points at, validated; None if there is none.
    On an object store a checkpoint that fails its checks is skipped for the previous one."""
    if isinstance(root, Location):
        if not root.is_local:
            from fedbip_ray.runtime.checkpoint_remote import load

            return load(root)
        root = root.local_path
    pointer_path = root / "latest.json"
    if not pointer_path.exists():
        return None
    pointer = _read_json(pointer_path, root)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("path"), str) \
            or not _NAME.match(pointer["path"]) or not isinstance(pointer.get("round"), int):
        raise _bad(root, "latest.json is malformed")
    return read_checkpoint(root / pointer["path"], expected_round=pointer["round"])


def read_checkpoint(path: Path, expected_round: int | None = None) -> Checkpoint:
    """Load and validate one local checkpoint directory (sha256, shapes, dtypes, history)."""
    if not path.is_dir():
        raise _bad(path, "directory missing")
    meta = check_meta(_read_json(path / "meta.json", path), path, expected_round)
    files: dict[str, dict[str, np.ndarray]] = {}
    for name in checkpoint_files(meta):
        tensor_path = path / name
        if not tensor_path.is_file():
            raise _bad(path, f"{name} missing")
        if sha256_file(tensor_path) != (meta.get("sha256") or {}).get(name):
            raise _bad(path, f"{name} is corrupt (sha256 mismatch)")
        files[name] = load_tensors(lambda p=tensor_path: load_file(str(p)), path)
    return validated(path, meta, merge_tensor_files(files),
                     _read_json(path / "layout.json", path))


def checkpoint_files(meta: Mapping[str, Any]) -> list[str]:
    """The tensor files a checkpoint's meta.json lists (``server.safetensors`` at least)."""
    digests = meta.get("sha256") if isinstance(meta.get("sha256"), dict) else {}
    names = [n for n in digests if n == TENSORS or _SHARD.match(n)]
    return names if TENSORS in names else [TENSORS, *names]


def check_meta(meta: Any, where: Any, expected_round: int | None) -> dict[str, Any]:
    """meta.json of a format-``FORMAT`` checkpoint of round ``expected_round``."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(where, f"meta.json is not a format-{FORMAT} checkpoint")
    rnd = meta.get("round")
    if (not isinstance(rnd, int) or rnd < 1
            or (expected_round is not None and rnd != expected_round)):
        raise _bad(where, f"meta.json round {rnd!r} does not match latest.json ({expected_round})")
    return meta


def load_tensors(load: Callable[[], dict[str, np.ndarray]], where: Any) -> dict[str, np.ndarray]:
    """``load()`` of a safetensors file, its errors as one ConfigError line."""
    try:
        return load()
    except (SafetensorError, OSError, ValueError) as exc:
        raise _bad(where, f"{TENSORS} unreadable ({str(exc).splitlines()[0][:120]})") from None


def validated(where: Any, meta: dict[str, Any], tensors: dict[str, np.ndarray],
              layout: Any) -> Checkpoint:
    """The checkpoint at ``where`` once its layout, tensors and history check out."""
    try:
        lay = Layout.from_dict(layout)
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(where, f"layout.json invalid ({exc})") from None
    check_tensors(tensors, lay.size, where)
    rnd, history = meta["round"], meta.get("history")
    if not isinstance(history, list) or [r.get("round") if isinstance(r, dict) else None
                                         for r in history] != list(range(1, rnd + 1)):
        raise _bad(where, f"meta.json history is not rounds 1..{rnd}")
    config, extra = meta.get("config"), meta.get("extra")
    return Checkpoint(where, rnd, tensors, layout, history,
                      config if isinstance(config, dict) else {},
                      extra if isinstance(extra, dict) else {})


def check_tensors(tensors: Mapping[str, np.ndarray], size: int, path: Any) -> None:
    """states (N, D) f32 finite, init (D,) f32 finite, optional similarity (N, N) f64."""
    states, init, sim = tensors.get("states"), tensors.get("init"), tensors.get("similarity")
    if states is None or init is None:
        raise _bad(path, f"{TENSORS} lacks 'states' or 'init'")
    if states.dtype != np.float32 or states.ndim != 2 or states.shape[1] != size:
        raise _bad(path, f"states have shape {states.shape} {states.dtype}, "
                         f"expected (N, {size}) float32")
    if init.dtype != np.float32 or init.shape != (size,):
        raise _bad(path, f"init has shape {init.shape} {init.dtype}, expected ({size},) float32")
    n = states.shape[0]
    if sim is not None and sim.shape != (n, n):
        raise _bad(path, f"similarity has shape {sim.shape}, expected ({n}, {n})")
    if not (np.isfinite(states).all() and np.isfinite(init).all()):
        raise _bad(path, "states hold NaN/Inf")


# ---------------------------------------------------------------------------- resume checks
OPAQUE = ("strategy.params",)  # free-form mappings compared as a whole


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v and key not in OPAQUE:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_difference(saved: Mapping[str, Any], current: Mapping[str, Any],
                      frozen: Iterable[str] = FROZEN_ON_RESUME) -> str | None:
    """First ``key: saved -> current`` difference inside the ``frozen`` sections (keys present
    on both sides only, so fields added by a newer version do not count), or None."""
    a, b = _flatten(saved), _flatten(current)
    prefixes = tuple(frozen)
    for key in sorted(set(a) & set(b) - set(THAWED_ON_RESUME)):
        if any(key == p or key.startswith(p + ".") for p in prefixes) and a[key] != b[key]:
            return f"{key}: {a[key]!r} -> {b[key]!r}"
    return None


# ---------------------------------------------------------------------------- background writer
def lower_thread_priority(niceness: int = 19) -> None:
    """Make the calling thread yield the CPU to everything else (Linux: threads have their
    own nice value); a no-op elsewhere, where it would renice the whole process."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        except OSError:
            pass


ServerState = tuple[Mapping[str, np.ndarray], Layout]  # what the server's state_dict returns


def _fetch_and_write(fetch: Callable[[], ServerState], root: Root, rnd: int,
                     history: list[dict[str, Any]], config: Mapping[str, Any],
                     extra: Mapping[str, Any]) -> Path:
    tensors, layout = fetch()
    return write_checkpoint(root, rnd, tensors, layout.to_dict(), history, config, extra)


class CheckpointWriter:
    """Writes round checkpoints on one background thread, so the file I/O (safetensors,
    fsync, sha256) overlaps the next round. The thread runs at the lowest priority: on a
    machine whose cores are busy training, it takes only the CPU time they leave idle. At
    most one write is in flight: the next :meth:`submit` (or :meth:`wait`) waits for it and
    re-raises its error. A run killed while a write is in flight resumes from the previous
    checkpoint (writes are atomic)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedbip-checkpoint",
                                        initializer=lower_thread_priority)
        self._pending: Future[Path] | None = None

    def submit(self, fetch: Callable[[], ServerState], root: Root, rnd: int,
               history: list[dict[str, Any]], config: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> None:
        """Write round ``rnd``'s state under ``root`` in the background; ``fetch`` (called on
        the writer's thread) returns it. The caller asks the server for the state before
        submitting, so the next round cannot change it first."""
        self.wait()
        self._pending = self._pool.submit(_fetch_and_write, fetch, root, rnd,
                                          list(history), dict(config), dict(extra or {}))

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is on disk; its path."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Finish the write in flight (an error is logged: the run is ending anyway)."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - reported, the previous checkpoint stays valid
            text = str(exc).strip()
            log.error("checkpoint write failed: %s", text.splitlines()[0] if text else exc)
        self._pool.shutdown(wait=True)
