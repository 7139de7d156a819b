"""Which client a free worker takes next (pure; no Ray): the policy of
:func:`fedbip_ray.runtime.federation.dispatch`, shared with the benchmark's plain-process floor."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence


def home_queues(clients: Sequence[int], workers: int,
                prefer: Mapping[int, int] | None = None) -> dict[int, deque[int]]:
    """Each worker's own clients in order: client c goes to ``prefer[c]``, else ``c mod workers``."""
    queues: dict[int, deque[int]] = {w: deque() for w in range(workers)}
    for c in clients:
        queues[(prefer or {}).get(c, c % workers) % workers].append(c)
    return queues


def take_next(queues: dict[int, deque[int]], worker: int) -> int | None:
    """Pop the next client for a free ``worker``: its own next one, else the last one queued for
    the worker with the most left (work stealing); None when every queue is empty."""
    if queues[worker]:
        return queues[worker].popleft()
    donor = max(queues, key=lambda w: len(queues[w]))
    return queues[donor].pop() if queues[donor] else None
