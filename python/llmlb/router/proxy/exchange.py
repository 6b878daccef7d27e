"""One client request's life in the router (:class:`_Exchange`), how an attempt on a node
failed (:class:`_Failure` and its kinds), and the watch on the client's disconnect.

Apart from :mod:`.proxy` because the app, the forwarding and the relay all pass these along.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from llmlb.asgi import Receive, Scope, Send
from llmlb.prefix_keys import PrefixKeys
from llmlb.router.control.limits import PRIORITY_WEIGHTS
from llmlb.router.proxy.key_state import KeyState
from llmlb.router.proxy.usage import Usage

# Ways an attempt fails (``_Failure.kind``, and the ``kind`` label of the error metric).
_BUSY, _STATUS, _CONNECT = "busy", "status", "connect"
_TIMEOUT, _DISCONNECT = "timeout", "disconnect"


@dataclass(slots=True)
class _Failure:
    """What the client gets if no other node can take the request, and how the attempt
    failed: ``kind`` (busy, status, connect, timeout, disconnect); ``held``: the node had the
    request when it failed (it may have killed or hung the node)."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    kind: str = _STATUS
    held: bool = False


@dataclass(slots=True, eq=False)
class _Exchange:
    """One client request's life in the router: what it asks, what was sent, and why it was
    cut short.

    ``reason`` is set (``client_gone`` or ``total_timeout``) just before the request's task
    is cancelled; ``node`` is the node of the current attempt, if any; ``request`` (the
    body's hash) makes one request's failures count once per node.
    """

    scope: Scope
    send: Send
    task: asyncio.Task | None
    body: bytes
    model: str
    affinity_key: str | None
    start: float  # perf_counter() when the request arrived
    request: int = 0
    keys: PrefixKeys | None = None  # the body's prefix keys (prefix routing only)
    matched: int = 0  # prompt characters the index says the chosen node holds
    generation: int = 0  # of the chosen node in the index (see PrefixIndex.generation)
    started: bool = False  # http.response.start went out
    sse: bool = False
    finished: bool = False
    reason: str | None = None
    node: str | None = None
    anthropic: bool = False  # an Anthropic route: the router's errors in Anthropic's shape
    watch: _ClientWatch | None = None  # the client's disconnect watch, once armed
    receive: Receive | None = None  # the client's receive, until its watch is armed
    tap: bool = False  # read the node's usage out of the answer
    strip_usage: bool = False  # the router asked for the stream's usage chunk: drop it
    usage: Usage | None = None  # what the node reported
    status: int = 0  # of the node's answer relayed to the client
    rated: KeyState | None = None  # a limited key's counters: x-ratelimit-* on its answer
    flow: str | None = None  # the key's id: fair queuing across keys
    weight: float = PRIORITY_WEIGHTS["normal"]  # its share, by the key's priority
    priority: bytes = b""  # X-Llmlb-Priority sent to the node (a non-normal priority)

    def cut(self, reason: str) -> None:
        """Cancel the request (unless it is over already)."""
        if not self.finished and self.reason is None and self.task is not None:
            self.reason = reason
            self.task.cancel()


class _ClientWatch:
    """Cancels ``ex`` when its client disconnects.

    Granian's ``receive()`` returns a future: a callback on it costs a fraction of a task per
    request awaiting it. Any other awaitable (other ASGI servers, tests) runs as a task.
    """

    __slots__ = ("_receive", "_ex", "_waiter")

    def __init__(self, receive: Receive, ex: _Exchange) -> None:
        self._receive = receive
        self._ex = ex
        self._arm()

    def _arm(self) -> None:
        waiter: Any = self._receive()
        if not asyncio.isfuture(waiter):
            waiter = asyncio.ensure_future(waiter)
        self._waiter = waiter
        waiter.add_done_callback(self._done)

    def _done(self, waiter: Any) -> None:
        if waiter.cancelled() or self._ex.finished:
            return
        try:
            message = waiter.result()
        except Exception:  # the server failed the receive: nothing left to watch
            return
        if message["type"] == "http.disconnect":
            self._ex.cut("client_gone")
        else:
            self._arm()

    def close(self) -> None:
        """Stop watching (the request is over)."""
        if not self._waiter.done():
            self._waiter.cancel()


def _tokens_used(ex: _Exchange | None) -> int | None:
    """Tokens to settle a request's reservation with: the node's report; 0 when no node
    answered it successfully; ``None`` (the reservation stands) when an answer was cut
    without a report."""
    if ex is None or not ex.started or ex.status >= 400:
        return 0
    if ex.usage is not None:
        return ex.usage.total
    return None
