"""Weighted fair queuing across keys in the router's wait queue
(llmlb.router.proxy.wait_queue.WaitQueue), and the priority the proxy passes to the node."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from llmlb.router.control.fleet import FleetView
from llmlb.router.control.keys import KeyEntry
from llmlb.router.control.limits import parse_limits
from llmlb.router.proxy.wait_queue import WaitPlace, WaitQueue

from tests.test_router_admission import limited_call
from tests.test_router_proxy import CHAT, load, node, running, start_mock


@pytest.fixture(scope="module")
def mock(tmp_path_factory) -> str:
    proc, base = start_mock(tmp_path_factory.mktemp("mock") / "mock.log")
    yield base
    proc.stop()


async def _order(arrivals: list[tuple[str, float]]) -> list[str]:
    """Queue ``arrivals`` (flow, weight) in order, then wake them one at a time."""
    queue = WaitQueue()
    woken: list[str] = []

    async def waiter(flow: str, weight: float) -> None:
        assert await queue.wait("m", 5.0, flow=flow, weight=weight)
        woken.append(flow)

    tasks = []
    for flow, weight in arrivals:
        tasks.append(asyncio.create_task(waiter(flow, weight)))
        await asyncio.sleep(0)
    while queue.wake("m"):
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return woken


def test_a_burst_does_not_starve_a_trickle():
    order = asyncio.run(_order([("a", 2.0)] * 10 + [("b", 2.0)]))
    assert order.index("b") <= 1  # behind at most one request of the flooding key


def test_weights_give_shares_by_priority():
    order = asyncio.run(_order([("low", 1.0)] * 8 + [("high", 4.0)] * 4))
    assert order[:4].count("high") >= 3  # high's tags advance four times slower
    assert order[-1] == "low"


def test_one_flow_is_first_come_first_served_and_front_goes_first():
    async def scenario() -> list[int]:
        queue = WaitQueue()
        woken: list[int] = []

        async def waiter(i: int, front: bool = False) -> None:
            assert await queue.wait("m", 5.0, front=front)
            woken.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(waiter(99, front=True)))
        await asyncio.sleep(0)
        while queue.wake("m"):
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert len(queue) == 0 and not queue.has_waiters("m")
        return woken

    assert asyncio.run(scenario()) == [99, 0, 1, 2]


def test_timed_out_waiters_leave_the_queue():
    async def scenario() -> None:
        queue = WaitQueue()
        assert await queue.wait("m", 0.01, flow="a") is False
        assert len(queue) == 0 and not queue.wake("m")

    asyncio.run(scenario())


def test_the_node_gets_a_limited_keys_priority(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", f"{mock}/_mock/p/echo"))
        async with running(fleet) as proxy:
            for priority in ("high", "low"):
                entry = KeyEntry("key_p", "api", parse_limits({"priority": priority}))
                res = await limited_call(proxy, CHAT, entry)
                assert res.status == 200
                assert orjson.loads(res.body)["headers"]["x-llmlb-priority"] == priority
            entry = KeyEntry("key_n", "api", parse_limits({"priority": "normal"}))
            res = await limited_call(proxy, CHAT, entry)
            assert "x-llmlb-priority" not in orjson.loads(res.body)["headers"]

    asyncio.run(scenario())


def test_node_scheduler_starts_a_waiting_high_before_a_low():
    """The node side: jobs queue by the priority their request carried (the HTTP handler
    sets ``request_priority`` from ``X-Llmlb-Priority``), first come first served within
    one priority."""
    import collections
    import contextvars
    import threading
    import weakref

    from llmlb.node.inference.scheduler import Scheduler, request_priority

    scheduler = Scheduler.__new__(Scheduler)  # the queue alone: no model needed
    scheduler._pending = collections.deque()
    scheduler._ranks = weakref.WeakKeyDictionary()
    scheduler._cond = threading.Condition()
    scheduler._closing = False

    class FakeJob:
        def __init__(self, name: str) -> None:
            self.name = name

    jobs = []
    for name, priority in [("low1", "low"), ("n1", None), ("low2", "low"), ("high1", "high"),
                           ("n2", "normal"), ("high2", "high")]:
        job = FakeJob(name)
        jobs.append(job)

        def submit(job=job, priority=priority) -> None:
            request_priority.set(priority)
            scheduler.submit(job)

        contextvars.copy_context().run(submit)
    assert [job.name for job in scheduler._pending] == [
        "high1", "high2", "n1", "n2", "low1", "low2"
    ]


def test_waiters_woken_without_a_slot_keep_their_place_and_a_newcomer_is_not_behind_them():
    """The fleet changed (wake_all): every waiter looks for a slot, finds none and waits
    again at the place it had; a request of another key arriving then still goes second."""

    async def scenario() -> list[str]:
        queue = WaitQueue()
        served: list[str] = []
        rewait = asyncio.Event()

        async def waiter(name: str, flow: str, first_wake_is_spurious: bool) -> None:
            place = WaitPlace()
            front = False
            while True:
                assert await queue.wait("m", 5.0, front=front, flow=flow, weight=2.0, place=place)
                if first_wake_is_spurious and not rewait.is_set():
                    front = True  # no slot after all: wait again
                    continue
                served.append(name)
                return

        tasks = [asyncio.create_task(waiter(f"a{i}", "a", True)) for i in range(5)]
        await asyncio.sleep(0)
        queue.wake_all()
        for _ in range(3):
            await asyncio.sleep(0)
        rewait.set()
        tasks.append(asyncio.create_task(waiter("b", "b", False)))
        await asyncio.sleep(0)
        while queue.wake("m"):
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return served

    order = asyncio.run(scenario())
    assert order.index("b") <= 1, order


def test_a_flooding_key_does_not_hold_back_another_keys_request(mock):
    """Through the proxy: a node with one slot, key A queues eight requests, key B sends one
    after them; B is served after the request in progress and at most one queued request of
    A, not after A's backlog."""

    async def scenario() -> list[str]:
        fleet = FleetView()
        load(fleet, node("n1", f"{mock}/_mock/slow/sleep100", slots=1))
        finished: list[str] = []
        async with running(fleet) as proxy:
            key_a = KeyEntry("key_a", "api", None)
            key_b = KeyEntry("key_b", "api", None)

            async def send(name: str, entry: KeyEntry) -> None:
                res = await limited_call(proxy, CHAT, entry)
                assert res.status == 200
                finished.append(name)

            flood = [asyncio.create_task(send(f"a{i}", key_a)) for i in range(8)]
            while len(proxy.queue) < 7:  # one in progress, seven waiting
                await asyncio.sleep(0.005)
            trickle = asyncio.create_task(send("b", key_b))
            await asyncio.gather(*flood, trickle)
        return finished

    order = asyncio.run(scenario())
    # After the one in progress and at most one queued of A (FIFO would make it last).
    assert order.index("b") <= 2, order
