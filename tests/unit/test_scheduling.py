"""The dispatch policy: own clients first, then the last client queued on the busiest worker."""

from __future__ import annotations

from fedbip_ray.runtime.scheduling import home_queues, take_next


def test_home_queues_follow_preference_then_client_mod_workers():
    q = home_queues([0, 1, 2, 3, 4], 2, prefer={3: 0})
    assert {w: list(v) for w, v in q.items()} == {0: [0, 2, 3, 4], 1: [1]}


def test_a_free_worker_takes_its_own_then_steals_from_the_longest_queue_tail():
    q = home_queues(list(range(7)), 3)  # 0: [0, 3, 6], 1: [1, 4], 2: [2, 5]
    assert [take_next(q, 2), take_next(q, 2)] == [2, 5]
    assert take_next(q, 2) == 6  # the tail of worker 0's queue, the longest
    assert take_next(q, 1) == 1 and take_next(q, 0) == 0
    taken = [take_next(q, 2), take_next(q, 2)]
    assert sorted(taken) == [3, 4] and take_next(q, 0) is None
