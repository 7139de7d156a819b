"""Clients that joined a run (``fedbip join``) taking part in its further rounds.

``data.joined`` lists join output directories (``RUN/joined``); on ``--resume`` their newcomers
become clients ``N, N+1, ...`` after the run's ``N`` (in the order listed): each newcomer's
shard, as the join split it, is its shard, and the adapter the join gave it
(``state.safetensors``) is its state in the checkpoint. The stored clients' states and the
rounds already run are untouched. The list may only grow from one resume to the next.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fedbip_ray.config import ConfigError
from fedbip_ray.data.shards import CLIENTS_FILE, ShardSet, shard_path
from fedbip_ray.runtime.checkpoint import Checkpoint


@dataclass(frozen=True)
class JoinedClient:
    """One newcomer of a join directory: its name, shard and joined state files."""

    name: str
    shard: Path
    state: Path


def _entries(directory: Path) -> list[dict]:
    try:
        return list(json.loads((directory / "summary.json").read_text())["newcomers"])
    except FileNotFoundError:
        raise ConfigError(f"data.joined: {directory} is not a join output "
                          "(no summary.json; see fedbip join)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"data.joined: {directory}/summary.json unreadable "
                          f"({type(exc).__name__})") from None


def read_joined(directories: Sequence[str], num_stored: int) -> list[JoinedClient]:
    """The newcomers of every directory in order; ConfigError (one line) when a directory is
    missing, incomplete, or joined a run of another size than this run had at that point
    (its clients plus the newcomers listed before)."""
    out: list[JoinedClient] = []
    for name in directories:
        d = Path(name)
        if not d.is_dir():
            raise ConfigError(f"data.joined: directory {name} not found")
        entries = _entries(d)
        first = min((int(e["client_id"]) for e in entries), default=num_stored + len(out))
        if first != num_stored + len(out):
            raise ConfigError(f"data.joined: {name} joined a run of {first} clients; here it "
                              f"follows {num_stored} clients + {len(out)} joined before it")
        for e in sorted(entries, key=lambda e: int(e["client_id"])):
            client = JoinedClient(str(e["name"]), d / "shards" / f"{e['directory']}.parquet",
                                  d / str(e["directory"]) / "state.safetensors")
            for path in (client.shard, client.state):
                if not path.is_file():
                    raise ConfigError(f"data.joined: {name}: {path.name} of newcomer "
                                      f"'{client.name}' not found")
            out.append(client)
    return out


def check_growth(saved: Sequence[str], current: Sequence[str]) -> None:
    """ConfigError unless ``current`` extends the checkpoint's ``saved`` list."""
    if list(current[: len(saved)]) != list(saved):
        raise ConfigError(f"--resume: data.joined {list(current)} must start with the "
                          f"checkpoint's {list(saved)} (joined clients can be added, not "
                          "removed or reordered)")


def _summary_entry(client: int, path: Path, name: str, num_labels: int) -> dict:
    """The clients.json entry of a joined client's shard (group -1: unknown)."""
    table = pq.read_table(path, columns=["label", "split"]).to_pandas()
    labels = table["label"].to_numpy(dtype=np.int64)
    split = table["split"].value_counts()
    return {"client": client, "group": -1,
            **{s: int(split.get(s, 0)) for s in ("train", "val", "test")},
            "label_histogram": np.bincount(labels[labels >= 0], minlength=num_labels).tolist(),
            "joined": name}


def add_joined_shards(shards: ShardSet, joined: Sequence[JoinedClient]) -> ShardSet:
    """``shards`` with the joined clients' shards after the stored ones (files copied into
    the shard directory, ``clients.json`` rewritten)."""
    if not joined:
        return shards
    n = shards.num_clients
    paths, summary = list(shards.paths), list(shards.summary)
    for j, client in enumerate(joined):
        path = shard_path(shards.directory, n + j)
        shutil.copyfile(client.shard, path)
        paths.append(path)
        summary.append(_summary_entry(n + j, path, client.name, shards.num_labels))
    meta = {"label_names": list(shards.label_names), "clients": summary}
    (shards.directory / CLIENTS_FILE).write_text(json.dumps(meta, indent=1))
    return ShardSet(shards.directory, tuple(paths), (*shards.groups, *([-1] * len(joined))),
                    shards.label_names, tuple(summary))


def _pad(x: np.ndarray, rows: int, square: bool) -> np.ndarray:
    """``x`` grown to ``rows`` rows (and columns when ``square``) with NaN: nothing known."""
    shape = (rows, rows) if square else (rows, *x.shape[1:])
    out = np.full(shape, np.nan, dtype=x.dtype)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def grow_checkpoint(ck: Checkpoint, joined: Sequence[JoinedClient],
                    num_stored: int) -> Checkpoint:
    """``ck`` with a state row for every joined client it does not hold yet (its joined
    adapter); similarity and strategy memory rows for them unknown (NaN)."""
    from safetensors.numpy import load_file

    have = ck.num_clients - num_stored
    if not 0 <= have <= len(joined):
        raise ConfigError(f"--resume: checkpoint holds {ck.num_clients} clients, the run has "
                          f"{num_stored} + {len(joined)} joined (data.joined)")
    if have == len(joined):
        return ck
    states = ck.tensors["states"]
    rows = [np.asarray(load_file(str(c.state))["state"], dtype=np.float32)
            for c in joined[have:]]
    for c, row in zip(joined[have:], rows, strict=True):
        if row.shape != states.shape[1:]:
            raise ConfigError(f"data.joined: newcomer '{c.name}' has a state of {row.shape}, "
                              f"the run's adapter has {states.shape[1:]}")
    tensors = dict(ck.tensors, states=np.concatenate([states, np.stack(rows)]))
    total = num_stored + len(joined)
    if "similarity" in tensors:
        tensors["similarity"] = _pad(tensors["similarity"], total, square=True)
    if "memory" in tensors:
        tensors["memory"] = _pad(tensors["memory"], total, square=False)
    return replace(ck, tensors=tensors)


def with_joined(directories: Sequence[str], ck: Checkpoint | None,
                shards: ShardSet) -> tuple[Checkpoint | None, ShardSet]:
    """The checkpoint and shards of a resumed run with the clients of ``directories`` added
    (unchanged without any); ConfigError when there is no checkpoint to resume."""
    if not directories:
        return ck, shards
    if ck is None:
        raise ConfigError("data.joined: joined clients take part in further rounds of the run "
                          "they joined: give --resume RUN (a run with a checkpoint)")
    joined = read_joined(directories, shards.num_clients)
    return grow_checkpoint(ck, joined, shards.num_clients), add_joined_shards(shards, joined)
