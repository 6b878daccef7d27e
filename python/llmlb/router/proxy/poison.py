"""The poison log: requests (by a hash of their body) that nodes lost or timed out on while
holding them; one that two nodes failed that way is refused for a while.

Apart from :mod:`.balancer` (which picks nodes): it judges requests, not nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Suspect:
    nodes: list[str]  # the nodes that lost the request or timed out on it
    expires: float
    poison: bool = False


class PoisonLog:
    """Requests (by a hash of their body) that a node lost (connection closed, stream cut) or
    timed out on while holding them.

    A request that two different nodes failed that way is *poison*: most likely it kills or
    hangs whatever node takes it, so it is refused without reaching a node for ``ttl_s``
    (an SDK's automatic retries of the same body included). Bounded: beyond ``max_entries``
    the oldest entries are dropped.

    Args:
        ttl_s: how long a failure (and a poison verdict) is remembered.
        max_entries: requests remembered at most.
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        ttl_s: float = 600.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl_s = ttl_s
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._entries: dict[int, _Suspect] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def is_poison(self, request: int) -> bool:
        """True while ``request`` is remembered as poison."""
        entry = self._entries.get(request)
        if entry is None:
            return False
        if self._clock() >= entry.expires:
            del self._entries[request]
            return False
        return entry.poison

    def strike(self, request: int, node_id: str) -> list[str] | None:
        """Record that ``node_id`` lost ``request`` or timed out on it.

        Returns:
            The nodes that failed it (oldest first) when this failure makes it poison, else
            ``None``.
        """
        now = self._clock()
        entries = self._entries
        entry = entries.get(request)
        if entry is None or now >= entry.expires:
            entries.pop(request, None)
            entries[request] = _Suspect([node_id], now + self.ttl_s)
            if len(entries) > self.max_entries:
                del entries[next(iter(entries))]
            return None
        entry.expires = now + self.ttl_s
        if entry.poison or node_id in entry.nodes:
            return None
        entry.nodes.append(node_id)
        entry.poison = True
        return entry.nodes

    def served(self, request: int) -> None:
        """A node answered ``request`` in full: forget its failures (unless it is poison)."""
        entry = self._entries.get(request)
        if entry is not None and not entry.poison:
            del self._entries[request]
