"""Deterministic partitioners: example indices -> clients, plus per-client splits.

All functions are pure given their ``seed``; they return int64 index arrays into the dataset.
"""

from __future__ import annotations

import numpy as np


def iid(n: int, num_clients: int, per_client: int | None, seed: int) -> list[np.ndarray]:
    """Shuffle and deal ``per_client`` (default: all, evenly) examples to each client."""
    order = np.random.default_rng(seed).permutation(n)
    if per_client is not None:
        order = order[: per_client * num_clients]
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, per_client: int | None, seed: int
) -> list[np.ndarray]:
    """Label skew: each client's class proportions ~ Dir(alpha); sizes equal to ``per_client``
    (default n // num_clients). Sampling without replacement, classes refilled when exhausted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    size = per_client or len(labels) // num_clients
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    parts = []
    for _ in range(num_clients):
        props = rng.dirichlet(np.full(len(classes), alpha))
        counts = rng.multinomial(size, props)
        chosen: list[int] = []
        for c, k in zip(classes, counts, strict=True):
            take = min(k, len(pools[c]))
            chosen.extend(pools[c][:take])
            del pools[c][:take]
        short = size - len(chosen)
        if short > 0:  # fill from whatever is left, largest pools first
            for c in sorted(pools, key=lambda c: -len(pools[c])):
                take = min(short, len(pools[c]))
                chosen.extend(pools[c][:take])
                del pools[c][:take]
                short -= take
        parts.append(np.sort(np.asarray(chosen, dtype=np.int64)))
    return parts


def pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, per_client: int | None, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Pathological label skew: each client holds ``classes_per_client`` classes only.

    Client c gets the classes ``(c·k + j) mod K`` for ``j < k`` of a seeded class permutation
    (so every class is used as evenly as the counts allow) and an equal share of ``per_client``
    (default n // num_clients) from each. Sampling without replacement; a class that runs out
    is refilled from a fresh permutation of its rows (clients sharing a class may then share
    rows; a client never holds a row twice, so a class smaller than one client's share gives
    that client all its rows). Returns (indices per client, group = the client's first class).
    """
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    k = min(int(classes_per_client), len(classes))
    size = per_client or len(labels) // num_clients
    rows = {c: np.flatnonzero(labels == c) for c in classes}
    pools: dict[int, list[int]] = {c: [] for c in classes}
    parts, groups = [], np.empty(num_clients, dtype=np.int64)
    for c in range(num_clients):
        mine = [classes[(c * k + j) % len(classes)] for j in range(k)]
        groups[c] = mine[0]
        chosen: list[int] = []
        for cls, count in zip(mine, np.array_split(np.arange(size), k), strict=True):
            need = len(count)
            while need > 0:
                if not pools[cls]:
                    pools[cls] = list(rng.permutation(rows[cls]))
                take = pools[cls][:need]
                del pools[cls][:need]
                chosen.extend(take)
                need -= len(take)
        parts.append(np.sort(np.unique(np.asarray(chosen, dtype=np.int64))))
    return parts, groups


def by_column(
    keys: np.ndarray, num_clients: int, per_client: int | None, seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Natural partition by a key column (domain, task, user).

    With at least ``num_clients`` distinct keys: the most frequent ``num_clients`` keys, one
    client each. With fewer keys: clients are dealt round-robin to the keys and each key's rows
    are split among its clients. Returns (indices per client, group = key index per client).
    """
    values, counts = np.unique(keys, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rng = np.random.default_rng(seed)
    if len(values) >= num_clients:
        top = values[order[:num_clients]]
        parts = []
        for v in top:
            idx = rng.permutation(np.flatnonzero(keys == v))
            parts.append(np.sort(idx[:per_client] if per_client else idx))
        return parts, np.arange(num_clients, dtype=np.int64)  # every client its own key
    groups = np.arange(num_clients, dtype=np.int64) % len(values)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for g, v in enumerate(values[order]):
        members = np.flatnonzero(groups == g)
        idx = rng.permutation(np.flatnonzero(keys == v))
        if per_client:
            idx = idx[: per_client * len(members)]
        for m, chunk in zip(members, np.array_split(idx, len(members)), strict=True):
            parts[m] = np.sort(chunk)
    # group ids follow key frequency order
    return parts, groups


def assign_groups(num_clients: int, num_groups: int) -> np.ndarray:
    """Client c belongs to group c % num_groups: (num_clients,) int64."""
    return np.arange(num_clients, dtype=np.int64) % max(1, num_groups)


def shift_labels(labels: np.ndarray, group: int, num_labels: int) -> np.ndarray:
    """Concept shift: group g sees label y as (y + g) mod K (g=0 unchanged; K=2 flips)."""
    return (labels + group) % num_labels


def split_client(
    idx: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random train/val/test split of one client's indices (at least 1 test example)."""
    order = np.random.default_rng(seed).permutation(idx)
    n_test = max(1, round(len(order) * test_fraction))
    n_val = round(len(order) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def split_given(idx: np.ndarray, splits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The user's own split of one client's indices: ``splits`` (n,) holds each dataset row's
    split name ("train"/"val"/"test"); returns sorted (train, val, test) int64 indices."""
    mine = splits[idx]
    train, val, test = (np.sort(idx[mine == s]).astype(np.int64) for s in ("train", "val", "test"))
    return train, val, test


def groups_of_clients(parts: list[np.ndarray], group_keys: np.ndarray) -> np.ndarray:
    """(num_clients,) int64 group of each client: the index, among the sorted distinct groups
    of all clients, of the group its rows carry (``group_keys`` (n,) per dataset row; every
    client's rows carry one group)."""
    firsts = [str(group_keys[p[0]]) if len(p) else "" for p in parts]
    index = {g: i for i, g in enumerate(sorted(set(firsts)))}
    return np.asarray([index[g] for g in firsts], dtype=np.int64)
