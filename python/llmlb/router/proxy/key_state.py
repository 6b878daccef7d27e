"""A limited key's counters in one router worker: the sliding minute's windows (rpm, tpm),
the budget period, and what the worker holds of the key's leases (:mod:`.admission` decides
with them; :mod:`llmlb.router.control.quota` grants the leases)."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmlb.router.control.limits import KeyLimits

# The sliding minute in one-second buckets: 61 of them, so a request admitted anywhere in
# second s still counts until s + 61, a full minute after it came whatever its fraction: no
# 60-second span ever admits more than the limit (the price: up to a second more to wait).
WINDOW_S = 61
REQUESTS = "requests"
TOKENS = "tokens"
BUDGET = "budget"


class Window:
    """Counts of the last :data:`WINDOW_S` seconds, one bucket per second."""

    __slots__ = ("buckets", "total", "second", "_frees_at")

    def __init__(self) -> None:
        self.buckets = [0] * WINDOW_S
        self.total = 0
        self.second = 0
        self._frees_at: float | None = None  # when the oldest count leaves (cached)

    def _advance(self, second: int) -> None:
        last = self.second
        if second <= last:
            return
        self._frees_at = None
        buckets = self.buckets
        if second - last >= WINDOW_S:
            for i in range(WINDOW_S):
                buckets[i] = 0
            self.total = 0
        else:
            for s in range(last + 1, second + 1):
                i = s % WINDOW_S
                self.total -= buckets[i]
                buckets[i] = 0
        self.second = second

    def used(self, now: float) -> int:
        """The count of the last minute."""
        self._advance(int(now))
        return self.total

    def add(self, now: float, n: int) -> int:
        """Count ``n`` at ``now``; returns the second it was counted in."""
        second = int(now)
        self._advance(second)
        if not self.total:
            self._frees_at = None
        self.buckets[second % WINDOW_S] += n
        self.total += n
        return second

    def adjust(self, second: int, delta: int) -> None:
        """Change what was counted at ``second`` by ``delta`` (a settled reservation); nothing
        when that second left the window."""
        if self.second - second >= WINDOW_S or second > self.second:
            return
        i = second % WINDOW_S
        delta = max(delta, -self.buckets[i])
        self.buckets[i] += delta
        self.total += delta
        if not self.buckets[i]:  # it may have been the oldest count
            self._frees_at = None

    def next_free(self, now: float) -> float:
        """Seconds until the oldest count leaves the window (0 when empty); computed once a
        second (it is in every answer's headers)."""
        self._advance(int(now))
        if not self.total:
            return 0.0
        if self._frees_at is None:
            self._frees_at = now + self.frees_in(now, 1)
        return max(0.0, self._frees_at - now)

    def frees_in(self, now: float, excess: int) -> float:
        """Seconds until at least ``excess`` of the count has left the window."""
        self._advance(int(now))
        freed = 0
        for s in range(self.second - WINDOW_S + 1, self.second + 1):
            freed += self.buckets[s % WINDOW_S]
            if freed >= excess:
                return max(0.0, s + WINDOW_S - now)
        return float(WINDOW_S)


def period_bounds(period: str, now: float) -> tuple[str, float]:
    """The budget period containing ``now``: its label (``2026-12-07``, ``2026-12``) and the
    unix time it ends (UTC)."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = calendar.timegm((moment.year, moment.month, moment.day, 0, 0, 0))
        return moment.strftime("%Y-%m-%d"), float(start + 86400)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.strftime("%Y-%m"), float(calendar.timegm((year, month, 1, 0, 0, 0)))


def period_start(period: str, now: float) -> float:
    """The unix time the budget period containing ``now`` began (UTC)."""
    moment = datetime.fromtimestamp(now, UTC)
    day = moment.day if period == "day" else 1
    return float(calendar.timegm((moment.year, moment.month, day, 0, 0, 0)))


class KeyState:
    """One limited key's counters in this worker."""

    __slots__ = (
        "key_id",
        "limits",
        "requests",
        "tokens",
        "inflight",
        "period",
        "period_end",
        "base",
        "flushing",
        "pending",
        "reserved",
        "leases",
        "budget_held",
        "budget_used_at",
        "slots",
        "slots_until",
        "slots_used_at",
        "header_cache",
    )

    def __init__(self, key_id: str, limits: KeyLimits) -> None:
        self.key_id = key_id
        self.limits = limits
        self.requests = Window()
        self.tokens = Window()
        self.inflight = 0
        self.period = ""
        self.period_end = 0.0
        # Tokens of the budget period: stored (every router's, as of the last sync), being
        # written by this worker, and settled here since.
        self.base = 0
        self.flushing = 0
        self.pending = 0
        self.reserved = 0  # tokens reserved by requests in flight
        self.leases: dict[str, Lease] = {}  # shared mode: this second's grants by kind
        # Shared mode: tokens of the period's budget leased here and not yet reserved, and
        # when a request last reserved some (an idle lease goes back).
        self.budget_held = 0
        self.budget_used_at = 0.0
        # Shared mode: parallel slots leased here (requests in flight count against them),
        # usable until ``slots_until`` (this worker's clock: the last renewal + TTL - margin),
        # and when a request of the key last started or ended here.
        self.slots = 0
        self.slots_until = 0.0
        self.slots_used_at = 0.0
        self.header_cache: tuple[Any, tuple[bytes, ...]] | None = None

    @property
    def spent(self) -> int:
        """Tokens used in the budget period, as far as this worker knows."""
        return self.base + self.flushing + self.pending

    def roll(self, now: float) -> None:
        """Start a new budget period when ``now`` left the current one."""
        period = self.limits.budget_period
        if period is not None and now >= self.period_end:
            self.period, self.period_end = period_bounds(period, now)
            self.base = self.flushing = self.pending = 0
            self.budget_held = 0  # the old period's lease lapses


@dataclass(slots=True)
class Lease:
    """What this worker holds of a key's quota of one kind, granted for ``second``; ``used``:
    the fleet's grants in the window as of the last grant."""

    second: int = 0
    left: int = 0
    used: int = 0
