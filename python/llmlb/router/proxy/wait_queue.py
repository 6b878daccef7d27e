"""The wait queue: requests waiting for a free slot on a model's nodes, woken in
start-time fair-queuing order across keys (weighted by priority).

Apart from :mod:`.balancer` (which picks among nodes with a free slot): it orders the
requests that found none.
"""

from __future__ import annotations

import asyncio
import heapq
import math


class WaitPlace:
    """A request's place in the wait queue, kept across its waits: woken without finding a
    slot, it waits again with the tag it had, not behind requests that came later."""

    __slots__ = ("tag",)

    def __init__(self) -> None:
        self.tag: float | None = None


class _ModelQueue:
    """The waiters of one model, ordered by their weighted-fair-queuing tag."""

    __slots__ = ("heap", "live", "vtime", "last", "seq")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, asyncio.Future[bool]]] = []
        self.live: set[asyncio.Future[bool]] = set()
        self.vtime = 0.0  # the tag of the waiter woken last
        self.last: dict[str | None, float] = {}  # each flow's last tag
        self.seq = 0


class WaitQueue:
    """Requests waiting for a free slot, per model, with a global bound; woken by weighted
    fair queuing across flows (keys).

    Start-time fair queuing: each waiter gets a start tag, the later of the queue's virtual
    time (the start tag of the waiter woken last) and the end of its flow's previous waiter
    (whose start plus ``1 / weight``); the smallest start is woken first. One key's burst
    thus takes its share (its weight) and no more while others wait, and a key sending one
    request now and then waits behind at most one queued request of each other key,
    whatever their backlog. A single flow (or none given) is first come, first served.

    Args:
        max_waiters: requests allowed to wait at once (across models); more are refused.
    """

    def __init__(self, max_waiters: int = 1024):
        self.max_waiters = max_waiters
        self._waiters: dict[str, _ModelQueue] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def has_waiters(self, model_id: str) -> bool:
        """True when some request for ``model_id`` is already waiting."""
        queue = self._waiters.get(model_id)
        return queue is not None and bool(queue.live)

    def full(self) -> bool:
        """True when no more requests may wait."""
        return self._count >= self.max_waiters

    async def wait(
        self,
        model_id: str,
        timeout: float,
        *,
        front: bool = False,
        flow: str | None = None,
        weight: float = 1.0,
        place: WaitPlace | None = None,
    ) -> bool:
        """Wait until woken or ``timeout``.

        Args:
            front: a woken request that found no slot after all: back at the head (at the
                tag ``place`` kept, when given).
            flow: whose request (a key id); ``weight``: its share (priority).
            place: the request's place across its waits.

        Returns:
            True when woken, False on timeout.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        queue = self._waiters.get(model_id)
        if queue is None:
            queue = self._waiters[model_id] = _ModelQueue()
        if place is not None and place.tag is not None:
            tag = place.tag
        elif front:
            tag = -math.inf
        else:  # start-time fair queuing: ordered by start tags
            tag = max(_now_tag(queue), queue.last.get(flow, 0.0))
            queue.last[flow] = tag + 1.0 / max(weight, 1e-6)  # where its next one starts
            if place is not None:
                place.tag = tag
        queue.seq += 1
        heapq.heappush(queue.heap, (tag, queue.seq, future))
        queue.live.add(future)
        self._count += 1
        timer = loop.call_later(timeout, _resolve, future, False)
        try:
            return await future
        finally:
            timer.cancel()
            if future in queue.live:  # timed out or cancelled: still queued
                queue.live.discard(future)
                self._count -= 1
            if not queue.live and self._waiters.get(model_id) is queue:
                del self._waiters[model_id]

    def wake(self, model_id: str | None = None) -> bool:
        """Wake the first waiter for ``model_id``, else the first waiter of some other model.

        Returns:
            True when a waiter was woken.
        """
        if not self._count:
            return False
        if model_id is not None and self._wake_from(model_id):
            return True
        return any(self._wake_from(other) for other in list(self._waiters))

    def wake_all(self) -> None:
        """Wake every waiter (the fleet changed: capacity may have appeared)."""
        for model_id in list(self._waiters):
            while self._wake_from(model_id):
                pass

    def _wake_from(self, model_id: str) -> bool:
        queue = self._waiters.get(model_id)
        if queue is None:
            return False
        heap, live = queue.heap, queue.live
        while heap:
            tag, _, future = heapq.heappop(heap)
            if future not in live:
                continue  # timed out or cancelled earlier
            live.discard(future)
            self._count -= 1
            if tag > queue.vtime:
                queue.vtime = tag
            if not future.done():
                future.set_result(True)
                return True
        return False


def _now_tag(queue: _ModelQueue) -> float:
    """The queue's virtual time: the tag at its head (waiters woken but not served keep
    theirs), else the tag woken last."""
    heap, live = queue.heap, queue.live
    while heap and heap[0][2] not in live:
        heapq.heappop(heap)
    if heap and heap[0][0] != -math.inf:
        return min(heap[0][0], queue.vtime)
    return queue.vtime


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
