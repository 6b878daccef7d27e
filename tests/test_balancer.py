"""Unit tests of llmlb.router.proxy.balancer: node choice, failures and cool-down, the wait queue,
the poison log."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from llmlb.router.control.fleet import NodeView
from llmlb.router.proxy.balancer import Balancer, NodeState, NoPick
from llmlb.router.proxy.poison import PoisonLog
from llmlb.router.proxy.wait_queue import WaitQueue


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def nodes(*specs: tuple[str, int]) -> list[NodeView]:
    return [NodeView(node_id, f"http://{node_id}:1", slots) for node_id, slots in specs]


def balancer(**kw) -> Balancer:
    kw.setdefault("rng", random.Random(7))
    return Balancer(**kw)


def test_single_node_is_picked_and_state_tracks_slots():
    bal = balancer()
    views = nodes(("a", 2))
    pick = bal.pick(views)
    assert isinstance(pick, NodeState) and pick.node_id == "a"
    assert bal.nodes["a"].slots == 2
    bal.pick(nodes(("a", 5)))  # slots follow the fleet
    assert bal.nodes["a"].slots == 5


def test_least_outstanding_per_slot_wins_between_two():
    bal = balancer()
    views = nodes(("a", 4), ("b", 1))
    for view in views:
        bal.state(view)
    bal.nodes["a"].outstanding = 2  # 2/4 busy
    bal.nodes["b"].outstanding = 0  # 0/1 busy
    assert all(bal.pick(views).node_id == "b" for _ in range(20))
    bal.nodes["a"].outstanding = 0
    bal.nodes["b"].outstanding = 0
    picks = Counter(bal.pick(views).node_id for _ in range(400))
    assert 120 < picks["a"] < 280  # ties are broken at random


def test_power_of_two_choices_never_picks_the_most_loaded_of_three():
    bal = balancer()
    views = nodes(("a", 10), ("b", 10), ("c", 10))
    for view, load in zip(views, (9, 1, 0), strict=True):
        bal.state(view).outstanding = load
    picks = Counter(bal.pick(views).node_id for _ in range(600))
    assert picks["a"] == 0
    # c is chosen whenever it is drawn (2 of 3 pairs), b only in the pair (a, b).
    assert picks["c"] > picks["b"] > 0


def test_saturated_nodes_are_skipped_and_all_saturated_is_reported():
    bal = balancer()
    views = nodes(("a", 1), ("b", 1))
    bal.state(views[0]).outstanding = 1
    assert bal.pick(views).node_id == "b"
    bal.state(views[1]).outstanding = 1
    assert bal.pick(views) is NoPick.SATURATED


def test_exclude_and_empty_candidates():
    bal = balancer()
    views = nodes(("a", 1), ("b", 1))
    assert bal.pick(views, exclude=["a"]).node_id == "b"
    assert bal.pick(views, exclude=["a", "b"]) is NoPick.NONE
    assert bal.pick([]) is NoPick.NONE


def test_affinity_prefers_last_node_until_it_is_saturated():
    bal = balancer()
    views = nodes(("a", 2), ("b", 2))
    bal.remember("u:alice", "a")
    bal.state(views[0]).outstanding = 1  # busier than b, but still has a free slot
    assert all(bal.pick(views, "u:alice").node_id == "a" for _ in range(20))
    bal.state(views[0]).outstanding = 2  # saturated: affinity yields
    assert bal.pick(views, "u:alice").node_id == "b"
    assert bal.pick(views, "u:bob").node_id == "b"  # unknown key: plain balancing


def test_affinity_table_is_bounded_oldest_first():
    bal = balancer(affinity_max_keys=3)
    for index in range(5):
        bal.remember(f"k{index}", "a")
    assert bal.affinity("k0") is None and bal.affinity("k1") is None
    assert bal.affinity("k4") == "a"
    bal.remember("k2", "b")  # re-remembering moves the key to the newest end
    bal.remember("k5", "a")
    assert bal.affinity("k2") == "b" and bal.affinity("k3") is None


def test_repeated_failures_cool_a_node_down_until_a_probe_succeeds():
    clock = Clock()
    due: list[str] = []
    bal = balancer(
        failure_threshold=2,
        cooldown_s=5.0,
        clock=clock,
        on_probe_due=lambda s: due.append(s.node_id),
    )
    views = nodes(("a", 1), ("b", 1))
    a = bal.state(views[0])
    assert bal.record_failure(a) is False
    bal.record_success(a)  # success resets the count
    assert bal.record_failure(a) is False
    assert bal.record_failure(a) is True
    assert all(bal.pick(views).node_id == "b" for _ in range(10))
    assert due == ["a"]  # probed during the cool-down, one probe at a time
    assert bal.cooldown_left(views) == 5.0
    bal.probe_finished(a, ok=False)  # probe failed: the cool-down lasts another 5 s
    clock.now += 1.0
    assert bal.cooldown_left(views) == 4.0
    bal.pick(views)
    assert due == ["a", "a"]  # a node cooling without a probe gets one
    clock.now += 3.0
    bal.probe_passed(a)  # passed before the end: still out until the cool-down is over
    assert not a.healthy and bal.pick(views).node_id == "b"
    clock.now += 1.0
    picks = Counter(bal.pick(views).node_id for _ in range(50))
    assert picks["a"] > 0  # back the moment the cool-down ended
    assert a.healthy and a.failures == 0


def test_failures_of_one_request_count_once_and_can_be_forgiven():
    bal = balancer(failure_threshold=2, cooldown_s=5.0)
    a = bal.state(nodes(("a", 1))[0])
    assert bal.record_failure(a, 11) is False
    assert bal.record_failure(a, 11) is False  # the same request again: not a new failure
    assert a.failures == 1
    bal.forgive(a, 11)
    assert a.failures == 0
    assert bal.record_failure(a, 12) is False
    assert bal.record_failure(a, 13) is True  # two different requests


def test_immediate_failure_and_all_cooling():
    bal = balancer(failure_threshold=5, cooldown_s=3.0)
    views = nodes(("a", 1))
    assert bal.record_failure(bal.state(views[0]), immediate=True) is True
    assert bal.pick(views) is NoPick.COOLING


def test_url_change_resets_node_state():
    bal = balancer()
    state = bal.state(NodeView("a", "http://old:1", 1))
    bal.record_failure(state, immediate=True)
    fresh = bal.pick([NodeView("a", "http://new:1", 1)])
    assert isinstance(fresh, NodeState) and fresh.healthy and fresh.url == "http://new:1"


def test_wait_queue_is_fifo_per_model_and_bounded():
    async def scenario() -> None:
        queue = WaitQueue(max_waiters=3)
        order: list[str] = []

        async def waiter(name: str, model: str) -> None:
            assert await queue.wait(model, 5.0)
            order.append(name)

        tasks = [asyncio.create_task(waiter(n, m)) for n, m in (("1", "x"), ("2", "y"), ("3", "x"))]
        await asyncio.sleep(0)
        assert len(queue) == 3 and queue.full()
        assert queue.has_waiters("x") and queue.has_waiters("y")
        assert queue.wake("x")
        await asyncio.sleep(0)
        assert order == ["1"]
        assert queue.wake("z")  # no waiter for z: some other model's oldest
        await asyncio.sleep(0)
        assert len(order) == 2 and len(queue) == 1
        queue.wake_all()
        await asyncio.gather(*tasks)
        assert sorted(order) == ["1", "2", "3"] and len(queue) == 0
        assert not queue.has_waiters("x")
        assert not queue.wake("x")

    asyncio.run(scenario())


def test_wait_queue_timeout_and_front():
    async def scenario() -> None:
        queue = WaitQueue()
        assert await queue.wait("x", 0.01) is False
        assert len(queue) == 0 and not queue.has_waiters("x")
        order: list[str] = []

        async def waiter(name: str, front: bool) -> None:
            await queue.wait("x", 5.0, front=front)
            order.append(name)

        first = asyncio.create_task(waiter("late", False))
        await asyncio.sleep(0)
        second = asyncio.create_task(waiter("requeued", True))
        await asyncio.sleep(0)
        queue.wake("x")
        await asyncio.sleep(0)
        assert order == ["requeued"]
        queue.wake("x")
        await asyncio.gather(first, second)
        assert order == ["requeued", "late"]

    asyncio.run(scenario())


def test_a_request_two_nodes_lost_is_poison_until_its_time_is_up():
    clock = Clock()
    log = PoisonLog(ttl_s=60.0, clock=clock)
    assert not log and not log.is_poison(1)
    assert log.strike(1, "a") is None  # one node lost it: maybe the node's fault
    assert log.strike(1, "a") is None and not log.is_poison(1)  # the same node again
    assert log.strike(1, "b") == ["a", "b"]  # a second node: poison, both named
    assert log.is_poison(1) and not log.is_poison(2)
    assert log.strike(1, "c") is None  # already poison: reported once
    log.served(1)  # a poison verdict stands even if some node later answered
    clock.now += 59.0
    assert log.is_poison(1)
    clock.now += 2.0
    assert not log.is_poison(1) and len(log) == 0  # forgotten after ttl_s


def test_a_request_another_node_served_is_forgotten_and_old_strikes_expire():
    clock = Clock()
    log = PoisonLog(ttl_s=60.0, clock=clock)
    log.strike(1, "a")
    log.served(1)
    assert log.strike(1, "b") is None  # served in between: a fresh first strike
    clock.now += 61.0
    assert log.strike(1, "c") is None  # b's strike expired
    assert not log.is_poison(1)


def test_poison_log_is_bounded():
    log = PoisonLog(ttl_s=60.0, max_entries=3, clock=Clock())
    for request in range(5):
        log.strike(request, "a")
        log.strike(request, "b")
    assert len(log) == 3
    assert not log.is_poison(0) and not log.is_poison(1)  # the oldest went first
    assert all(log.is_poison(request) for request in (2, 3, 4))
