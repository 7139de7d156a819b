"""Which client a free worker takes next (pure; no Ray): the policy of
:func:`fedbip_ray.runtime.federation.dispatch`, shared with the benchmark's plain-process floor.

Every client has a home worker (its data is already tokenized there). With the seconds each
client's call took last time (``cost``), each worker runs its own clients longest first and a
worker with nothing left takes the cheapest client queued on the worker with the most work
left, so the phase ends with short calls instead of one long call on an otherwise idle cluster
(longest-processing-time-first with work stealing). Clients without a known cost count as the
most expensive ones and keep their order."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence


def home_queues(clients: Sequence[int], workers: int, prefer: Mapping[int, int] | None = None,
                cost: Mapping[int, float] | None = None) -> dict[int, deque[int]]:
    """Each worker's own clients: client c goes to ``prefer[c]``, else ``c mod workers``; a
    queue runs longest ``cost`` first (unknown costs first, in client order)."""
    queues: dict[int, deque[int]] = {w: deque() for w in range(workers)}
    known = cost or {}
    order = sorted(range(len(clients)),
                   key=lambda i: (clients[i] in known, -known.get(clients[i], 0.0), i))
    for i in order:
        c = clients[i]
        queues[(prefer or {}).get(c, c % workers) % workers].append(c)
    return queues


def queued_work(queue: Sequence[int], cost: Mapping[int, float] | None) -> float:
    """Expected seconds left in ``queue``: known costs summed, an unknown one counted as the
    largest known (as 1 each when none is known, i.e. the queue length)."""
    known = cost or {}
    default = max(known.values(), default=1.0)
    return sum(known.get(c, default) for c in queue)


def take_next(queues: dict[int, deque[int]], worker: int,
              cost: Mapping[int, float] | None = None) -> int | None:
    """Pop the next client for a free ``worker``: its own next one, else the last (cheapest)
    one queued for the worker with the most expected work left (work stealing); None when
    every queue is empty."""
    if queues[worker]:
        return queues[worker].popleft()
    donor = max(queues, key=lambda w: (queued_work(queues[w], cost), len(queues[w])))
    return queues[donor].pop() if queues[donor] else None
