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


def test_known_costs_run_longest_first_and_unknown_ones_first_of_all():
    q = home_queues([0, 1, 2, 3, 4, 5], 2, cost={0: 1.0, 2: 5.0, 1: 2.0, 3: 9.0, 5: 0.5})
    assert {w: list(v) for w, v in q.items()} == {0: [4, 2, 0], 1: [3, 1, 5]}
    q = home_queues([0, 2, 4, 6], 2, cost={0: 1.0, 2: 5.0})  # 4, 6 unknown
    assert list(q[0]) == [4, 6, 2, 0]


def test_a_free_worker_steals_from_the_most_work_left_not_the_longest_queue():
    cost = {0: 1.0, 2: 1.0, 4: 1.0, 1: 8.0, 3: 0.5}
    q = home_queues([0, 1, 2, 3, 4], 2, cost=cost)  # 0: [0, 2, 4] (3 s), 1: [1, 3] (8.5 s)
    assert take_next(q, 0, cost) == 0 and take_next(q, 1, cost) == 1
    assert [take_next(q, 0, cost), take_next(q, 0, cost)] == [2, 4]
    assert take_next(q, 0, cost) == 3  # worker 1's cheapest, while its 8 s call runs
    assert take_next(q, 0, cost) is None


def test_lpt_order_with_stealing_shortens_the_phase_against_client_order():
    """Simulated phase on 2 workers: longest-first ends at 10 s where client order needs 13 s."""
    cost = {0: 3.0, 1: 3.0, 2: 3.0, 3: 3.0, 4: 7.0, 5: 1.0}

    def makespan(c: dict[int, float] | None) -> float:
        q, clock = home_queues(sorted(cost), 2, cost=c), [0.0, 0.0]
        while True:
            w = min(range(2), key=lambda i: clock[i])
            nxt = take_next(q, w, c)
            if nxt is None:
                w2 = 1 - w
                nxt = take_next(q, w2, c)
                if nxt is None:
                    return max(clock)
                w = w2
            clock[w] += cost[nxt]

    assert makespan(None) == 13.0 and makespan(cost) == 10.0
