"""Subscriptions between the node's parts: the resolver announces, others listen.

The resolver owns model state; the engine (load a model once downloaded) and the sync
loop (tell the router soon) subscribe to what it announces, so no part holds a callback
into another part that holds one back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


class Signal:
    """Callbacks run, in subscription order, each time the signal is emitted."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[..., Any]] = []

    def subscribe(self, callback: Callable[..., Any]) -> None:
        """Run ``callback(*args)`` on every :meth:`emit`."""
        self._callbacks.append(callback)

    def emit(self, *args: Any) -> None:
        """Call every subscriber."""
        for callback in self._callbacks:
            callback(*args)


class AsyncSignal:
    """Like :class:`Signal`, for coroutine callbacks awaited one after the other."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[..., Awaitable[Any]]] = []

    def subscribe(self, callback: Callable[..., Awaitable[Any]]) -> None:
        """Await ``callback(*args)`` on every :meth:`emit`."""
        self._callbacks.append(callback)

    async def emit(self, *args: Any) -> None:
        """Await every subscriber."""
        for callback in self._callbacks:
            await callback(*args)

    def __bool__(self) -> bool:
        """Whether anything subscribed."""
        return bool(self._callbacks)
