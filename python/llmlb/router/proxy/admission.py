"""Admission of a limited key's requests: rpm, tpm, parallel and budget counters, in memory.

One :class:`Admission` per worker holds a :class:`KeyState` for every key with limits that
sent a request. :meth:`Admission.admit` decides at once (no I/O): the model allowlist (403
``model_not_allowed``), ``max_parallel``, ``rpm``, ``tpm`` (429 ``rate_limit_exceeded``) and
the budget (429 ``insufficient_quota``). An admitted request reserves its tokens (the
prompt estimate plus its ``max_tokens``) in the minute's window and the budget; its
:class:`Ticket` is settled from the usage the node reported when it ends, so a burst of long
requests overshoots ``tpm`` or a budget by no more than the requests already in flight.

Windows are a sliding minute in one-second steps: a request counts against the limit from
the second it was admitted until 61 seconds after that second began, so no 60-second span
ever admits more than ``rpm`` requests (exact on one worker).

Keys without limits never reach this module: the proxy skips it for them.

Shared (routers on one PostgreSQL): ``rpm`` and ``tpm`` are admitted against leases of the
key's quota granted to this worker for the current second
(:mod:`llmlb.router.control.quota`); when a lease runs short, :meth:`Admission.admit` raises
:class:`NeedLease` and the proxy asks the runtime for another slice (a database write per
slice, never per request). What a second's lease did not use, and the difference between a
request's reserved and reported tokens, go back in the once-a-second batch
(:meth:`Admission.drain_adjustments`). A budget is admitted against a lease of the key's
budget for its period (:attr:`KeyState.budget_held`, leased by
:func:`llmlb.router.control.quota.lease_budget`); unused reservations go back into it, the
lease itself when idle or at shutdown (:meth:`Admission.release_budgets`,
:meth:`Admission.drain_budget_adjustments`).
``max_parallel`` is admitted against parallel slots leased to this worker
(:attr:`KeyState.slots`, :func:`llmlb.router.control.quota.lease_parallel`): a request
starts while the worker holds more slots than it has requests in flight, and its end frees
the slot here (no write); the batch renews the slots, gives back the idle ones (and those
another router wants), and slots not renewed for TTL - margin count as none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmlb.errors import ApiError
from llmlb.router.control.limits import KeyLimits
from llmlb.router.control.quota import PARALLEL, PARALLEL_MARGIN_S, PARALLEL_TTL_S
from llmlb.router.proxy.key_state import (
    BUDGET,
    REQUESTS,
    TOKENS,
    KeyState,
    Lease,
    period_start,
)

# Shared mode: a key's budget lease unused this long goes back to the fleet.
BUDGET_IDLE_S = 5.0
# Shared mode: a key's free parallel slots go back to the fleet when no request of it
# started or ended here for this long (at once when another router wants them).
PARALLEL_IDLE_S = 3.0
# Reservation for a request that names no max_tokens (the node's own cap may be larger; its
# usage settles the difference).
DEFAULT_MAX_TOKENS = 256
# A prompt estimate without a tokenizer: about four bytes of JSON body per token.
BYTES_PER_TOKEN = 4


class NeedLease(Exception):  # noqa: N818 - a request to the caller, not an error
    """Shared mode: this worker's lease of ``needs`` (``(kind, limit, amount)``) runs short;
    get more (:mod:`llmlb.router.control.quota`) and admit again. For :data:`BUDGET` the
    amount is what the lease must hold in all (the request's reservation); for
    :data:`PARALLEL` the slots to hold in all (the requests in flight here and this one)."""

    def __init__(self, needs: list[tuple[str, int, int]]) -> None:
        super().__init__("lease needed")
        self.needs = needs


@dataclass(slots=True)
class Ticket:
    """An admitted request's reservation, settled once by :meth:`Admission.settle`."""

    state: KeyState
    second: int
    reserved: int
    settled: bool = False
    period: str = ""  # shared budgets: the period whose lease it reserved from


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class LimitExceeded(ApiError):
    """429 (``rate_limit_exceeded`` or ``insufficient_quota``) with ``Retry-After``, or 403
    ``model_not_allowed``."""


class Admission:
    """The limited keys' counters of one worker.

    Args:
        clock: wall-clock seconds (budget periods are UTC); tests inject one.
    """

    def __init__(self, clock: Callable[[], float] = time.time, shared: bool = False) -> None:
        self.clock = clock
        self.shared = shared
        self.states: dict[str, KeyState] = {}
        # Shared mode: (key_id, kind, second) -> grants to give back (<0) or add (>0).
        self.adjustments: dict[tuple[str, str, int], int] = {}
        # Shared mode: (key_id, period) -> budget leases to give back (<0) or charge (>0).
        self.budget_adjustments: dict[tuple[str, str], int] = {}
        # Shared mode: parallel slots were given back or lapsed since the last renewal.
        self.slots_dropped = False

    def _lease(self, state: KeyState, kind: str, second: int) -> Lease:
        """``state``'s lease of ``kind`` for ``second``; an older one's rest is given back."""
        lease = state.leases.get(kind)
        if lease is None:
            lease = state.leases[kind] = Lease(second)
        elif lease.second != second:
            if lease.left > 0:
                self._adjust(state.key_id, kind, lease.second, -lease.left)
            lease.second, lease.left = second, 0
        return lease

    def _adjust(self, key_id: str, kind: str, second: int, amount: int) -> None:
        k = (key_id, kind, second)
        self.adjustments[k] = self.adjustments.get(k, 0) + amount

    def granted(self, key_id: str, kind: str, second: int, amount: int, used: int) -> None:
        """A lease of ``amount`` for ``second`` came back from the database."""
        state = self.states.get(key_id)
        if state is None:
            self._adjust(key_id, kind, second, -amount)
            return
        now_second = int(self.clock())
        lease = self._lease(state, kind, max(second, now_second))
        if lease.second == second:
            lease.left += amount
            lease.used = used
        else:  # granted for a second already over: back at once
            self._adjust(key_id, kind, second, -amount)

    def lacking(self, key_id: str, kind: str, need: int) -> bool:
        """Whether the lease of ``kind`` still lacks ``need`` (another request may have
        refilled it meanwhile)."""
        state = self.states.get(key_id)
        if state is None:
            return True
        if kind == BUDGET:
            state.roll(self.clock())
            return state.budget_held < need
        if kind == PARALLEL:
            return self.slots_held(key_id) <= state.inflight
        return self._lease(state, kind, int(self.clock())).left < need

    def budget_lease(self, key_id: str) -> tuple[str, float, float, int]:
        """The budget period of ``key_id`` now: its label, start and end (unix time), and the
        tokens of its lease held here."""
        state = self.states[key_id]
        now = self.clock()
        state.roll(now)
        period = state.limits.budget_period
        assert period is not None
        return state.period, period_start(period, now), state.period_end, state.budget_held

    def budget_granted(self, key_id: str, period: str, amount: int) -> None:
        """A lease of ``amount`` of ``key_id``'s budget for ``period`` came back from the
        database (given back at once when the period rolled meanwhile)."""
        state = self.states.get(key_id)
        if state is not None:
            state.roll(self.clock())
            if state.period == period:
                state.budget_held += amount
                state.budget_used_at = self.clock()
                return
        self._adjust_budget(key_id, period, -amount)

    def _adjust_budget(self, key_id: str, period: str, amount: int) -> None:
        k = (key_id, period)
        self.budget_adjustments[k] = self.budget_adjustments.get(k, 0) + amount

    def release_budgets(self, idle_s: float = 0.0) -> None:
        """Give back the budget leases of keys that reserved nothing for ``idle_s`` (0: all
        of them, as on shutdown); written by the next batch."""
        now = self.clock()
        for state in self.states.values():
            if state.budget_held > 0 and now - state.budget_used_at >= idle_s:
                state.roll(now)
                if state.budget_held > 0:
                    self._adjust_budget(state.key_id, state.period, -state.budget_held)
                    state.budget_held = 0

    def _slots(self, state: KeyState, now: float) -> int:
        """The parallel slots ``state``'s key holds here now: none once they lapsed (no
        renewal for :data:`PARALLEL_TTL_S` - :data:`PARALLEL_MARGIN_S`)."""
        if state.slots and now >= state.slots_until:
            state.slots = 0
            self.slots_dropped = True
        return state.slots

    def slots_held(self, key_id: str) -> int:
        """The parallel slots of ``key_id`` held here now (0 for an unknown key)."""
        state = self.states.get(key_id)
        return 0 if state is None else self._slots(state, self.clock())

    def slots_granted(self, key_id: str, total: int, leased_at: float) -> None:
        """The database now records ``total`` slots of ``key_id`` for this worker, renewed at
        ``leased_at`` (this worker's clock, read before the lease was asked for)."""
        state = self.states.get(key_id)
        if state is not None:
            state.slots = total
            state.slots_until = leased_at + PARALLEL_TTL_S - PARALLEL_MARGIN_S
            state.slots_used_at = self.clock()

    def slots_to_renew(self, idle_s: float = PARALLEL_IDLE_S) -> dict[str, int] | None:
        """Give back the free parallel slots of keys idle here for ``idle_s`` (0: every free
        slot; shutdown) and return what each key still holds, for the batch
        (:func:`llmlb.router.control.quota.renew_parallel`); ``None`` when there is nothing
        to write (nothing held, nothing given back since the last batch)."""
        now = self.clock()
        held: dict[str, int] = {}
        for key_id, state in self.states.items():
            slots = self._slots(state, now)
            if not slots:
                continue
            if state.limits.max_parallel is None:  # the limit was removed: all go back
                state.slots = slots = 0
                self.slots_dropped = True
            elif slots > state.inflight and now - state.slots_used_at >= idle_s:
                state.slots = slots = max(0, state.inflight)
                self.slots_dropped = True
            if slots:
                held[key_id] = slots
        return held if held or self.slots_dropped else None

    def slots_renewed(self, alive: dict[str, int], renewed_at: float) -> None:
        """The batch renewed ``alive`` (slots per key) at ``renewed_at``: what a key holds
        here is at most that, usable until ``renewed_at`` + TTL - margin."""
        self.slots_dropped = False
        until = renewed_at + PARALLEL_TTL_S - PARALLEL_MARGIN_S
        for key_id, state in self.states.items():
            if state.slots:
                state.slots = min(state.slots, alive.get(key_id, 0))
                if state.slots:
                    state.slots_until = until

    def give_back_wanted(self, wanted: set[str]) -> dict[str, int]:
        """Another router wants slots of the keys in ``wanted``: give back this worker's
        free ones; returns what each key changed still holds (to be written)."""
        out: dict[str, int] = {}
        for key_id in wanted:
            state = self.states.get(key_id)
            if state is not None and state.slots > state.inflight:
                state.slots = out[key_id] = max(0, state.inflight)
                self.slots_dropped = True  # the next renewal writes it if this write fails
        return out

    def drain_budget_adjustments(self) -> dict[tuple[str, str], int]:
        """Take the batch of budget lease returns and charges (to be written)."""
        out, self.budget_adjustments = self.budget_adjustments, {}
        return out

    def restore_budget_adjustments(self, changes: dict[tuple[str, str], int]) -> None:
        """Put back a batch of budget changes whose write failed."""
        for (key_id, period), amount in changes.items():
            self._adjust_budget(key_id, period, amount)

    def drain_adjustments(self) -> dict[tuple[str, str, int], int]:
        """Take the batch of grant returns and charges (to be written)."""
        out, self.adjustments = self.adjustments, {}
        return out

    def restore_adjustments(self, changes: dict[tuple[str, str, int], int]) -> None:
        """Put back a batch whose write failed."""
        for (key_id, kind, second), amount in changes.items():
            self._adjust(key_id, kind, second, amount)

    def state(self, key_id: str, limits: KeyLimits) -> KeyState:
        """The counters of ``key_id``, created on first use; new limits replace old ones and
        the counters carry on."""
        state = self.states.get(key_id)
        if state is None:
            state = self.states[key_id] = KeyState(key_id, limits)
        elif state.limits is not limits:
            if state.limits.budget_period != limits.budget_period:
                state.period_end = 0.0
            state.limits = limits
        return state

    def admit(self, key_id: str, limits: KeyLimits, model: str, estimate: int) -> Ticket:
        """Admit one request of ``key_id`` for ``model`` reserving ``estimate`` tokens.

        Raises:
            LimitExceeded: 403 for a model outside the allowlist; 429 for a limit reached.
        """
        if not limits.allows(model):
            raise LimitExceeded(
                403, "model_not_allowed", f"this key may not use model '{model}'", param="model"
            )
        now = self.clock()
        state = self.state(key_id, limits)
        if limits.max_parallel is not None and state.inflight >= limits.max_parallel:
            raise LimitExceeded(
                429,
                "rate_limit_exceeded",
                f"this key has {state.inflight} requests in flight, its limit "
                f"(max_parallel {limits.max_parallel}); retry when one ends",
                retry_after=1.0,
            )
        needs = None
        if self.shared and limits.max_parallel is not None:
            held = self._slots(state, now)
            if state.inflight >= held:  # to hold in all: those in flight and this one
                needs = [(PARALLEL, limits.max_parallel, state.inflight + 1)]
        if self.shared and (limits.rpm is not None or limits.tpm is not None):
            needs = (needs or []) + self._check_leases(state, limits, now, estimate)
        elif limits.rpm is not None:
            used = state.requests.used(now)
            if used >= limits.rpm:
                wait = state.requests.frees_in(now, used - limits.rpm + 1)
                raise LimitExceeded(
                    429,
                    "rate_limit_exceeded",
                    f"rate limit reached: {limits.rpm} requests per minute for this key; "
                    f"retry in {wait:.1f} s",
                    retry_after=wait,
                )
        if limits.tpm is not None and not self.shared:
            used = state.tokens.used(now)
            if used > 0 and used + estimate > limits.tpm:
                wait = state.tokens.frees_in(now, used + estimate - limits.tpm)
                raise LimitExceeded(
                    429,
                    "rate_limit_exceeded",
                    f"rate limit reached: {limits.tpm} tokens per minute for this key "
                    f"({used} used, this request reserves {estimate}); retry in {wait:.1f} s",
                    retry_after=wait,
                )
        if limits.budget_tokens is not None:
            state.roll(now)
            if state.spent + state.reserved >= limits.budget_tokens:
                raise LimitExceeded(
                    429,
                    "insufficient_quota",
                    f"this key's budget of {limits.budget_tokens} tokens per "
                    f"{limits.budget_period} is used up; it resets at the next period (UTC)",
                    retry_after=state.period_end - now,
                )
            if self.shared and state.budget_held < estimate:
                needs = needs or []
                needs.append((BUDGET, limits.budget_tokens, estimate))  # to hold in all
        if needs:
            raise NeedLease(needs)
        period = ""
        if limits.budget_tokens is not None:
            state.reserved += estimate
            if self.shared:
                state.budget_held -= estimate
                state.budget_used_at = now
                period = state.period
        state.inflight += 1
        state.slots_used_at = now
        second = state.requests.add(now, 1)
        if limits.tpm is not None:
            state.tokens.add(now, estimate)
        if self.shared:
            if limits.rpm is not None:
                state.leases[REQUESTS].left -= 1
            if limits.tpm is not None:
                state.leases[TOKENS].left -= estimate
        return Ticket(state, second, estimate, period=period)

    def _check_leases(
        self, state: KeyState, limits: KeyLimits, now: float, estimate: int
    ) -> list[tuple[str, int, int]]:
        """Shared mode: what this second's leases lack to cover one more request of
        ``estimate`` tokens (``(kind, limit, amount)``; empty when nothing)."""
        second = int(now)
        needs = []
        if limits.rpm is not None and self._lease(state, REQUESTS, second).left < 1:
            needs.append((REQUESTS, limits.rpm, 1))
        if limits.tpm is not None:
            left = self._lease(state, TOKENS, second).left
            if left < estimate:
                needs.append((TOKENS, limits.tpm, estimate - left))
        return needs

    def settle(self, ticket: Ticket, tokens: int | None) -> None:
        """End an admitted request: ``tokens`` it used by the node's report (``None``: no
        report, the reservation stands; 0: it never reached a node)."""
        if ticket.settled:
            return
        ticket.settled = True
        state = ticket.state
        state.inflight -= 1
        if self.shared and state.slots:
            state.slots_used_at = self.clock()  # the slot is free here, idle from now
        used = ticket.reserved if tokens is None else tokens
        if state.limits.tpm is not None:
            state.tokens.adjust(ticket.second, used - ticket.reserved)
            if self.shared and used != ticket.reserved:
                lease = state.leases.get(TOKENS)
                unused = ticket.reserved - used
                if lease is not None and lease.second == ticket.second and unused > 0:
                    lease.left += unused  # still this second: reusable at once
                else:
                    self._adjust(state.key_id, TOKENS, ticket.second, -unused)
        if state.limits.budget_tokens is not None:
            state.reserved -= ticket.reserved
            state.roll(self.clock())
            state.pending += used
            if ticket.period and ticket.period == state.period:
                # Shared: what it did not use goes back into the lease; what it used beyond
                # its reservation comes out of the lease, the rest is charged to it.
                state.budget_held += ticket.reserved - used
                if state.budget_held < 0:
                    self._adjust_budget(state.key_id, state.period, -state.budget_held)
                    state.budget_held = 0

    def budgets(self) -> dict[str, float]:
        """``{key_id: start of its budget period}`` of every key with a budget seen here."""
        now = self.clock()
        out = {}
        for key_id, state in self.states.items():
            period = state.limits.budget_period
            if period is not None:
                state.roll(now)
                out[key_id] = period_start(period, now)
        return out

    def begin_flush(self) -> None:
        """The usage settled so far is being written (call when draining the usage book)."""
        for state in self.states.values():
            if state.limits.budget_period is not None:
                state.flushing += state.pending
                state.pending = 0

    def synced(self, stored: dict[str, int], starts: dict[str, float]) -> None:
        """The write finished and ``stored`` is every router's usage of each budget key since
        the period start in ``starts`` (from :meth:`budgets`)."""
        for key_id, start in starts.items():
            state = self.states.get(key_id)
            if state is None or state.limits.budget_period is None:
                continue
            if period_start(state.limits.budget_period, self.clock()) != start:
                continue  # the period rolled meanwhile
            state.base = stored.get(key_id, 0)
            state.flushing = 0

    def headers(self, state: KeyState) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for ``state``'s key as it stands now (limits and
        resets rendered once a second, the remaining counts each time)."""
        limits = state.limits
        now = self.clock()
        requests, tokens = state.requests, state.tokens
        used_requests = requests.used(now)
        used_tokens = tokens.used(now)
        key = (int(now), limits, used_requests == 0, used_tokens == 0)
        cache = state.header_cache
        if cache is None or cache[0] != key:
            cache = state.header_cache = (key, _rendered(state, now))
        rpm_b, requests_reset_b, tpm_b, tokens_reset_b, budget_b, budget_reset_b = cache[1]
        out: list[tuple[bytes, bytes]] = []
        if limits.rpm is not None:
            lease = state.leases.get(REQUESTS)
            if lease is not None:  # shared: the fleet's grants, less what this worker holds
                used_requests = max(used_requests, lease.used - max(lease.left, 0))
            out += [
                (_LIMIT_REQUESTS, rpm_b),
                (_REMAINING_REQUESTS, str(max(0, limits.rpm - used_requests)).encode()),
                (_RESET_REQUESTS, requests_reset_b),
            ]
        token_limit = None
        if limits.tpm is not None:
            lease = state.leases.get(TOKENS)
            if lease is not None:
                used_tokens = max(used_tokens, lease.used - max(lease.left, 0))
            token_limit, remaining, reset_b = tpm_b, limits.tpm - used_tokens, tokens_reset_b
        if limits.budget_tokens is not None:
            state.roll(now)
            left = limits.budget_tokens - state.spent - state.reserved
            if token_limit is None or left < remaining:
                token_limit, remaining, reset_b = budget_b, left, budget_reset_b
        if token_limit is not None:
            out += [
                (_LIMIT_TOKENS, token_limit),
                (_REMAINING_TOKENS, str(max(0, remaining)).encode()),
                (_RESET_TOKENS, reset_b),
            ]
        return out


_LIMIT_REQUESTS = b"x-ratelimit-limit-requests"
_REMAINING_REQUESTS = b"x-ratelimit-remaining-requests"
_RESET_REQUESTS = b"x-ratelimit-reset-requests"
_LIMIT_TOKENS = b"x-ratelimit-limit-tokens"
_REMAINING_TOKENS = b"x-ratelimit-remaining-tokens"
_RESET_TOKENS = b"x-ratelimit-reset-tokens"


def _rendered(state: KeyState, now: float) -> tuple[bytes, ...]:
    """The limits and resets of ``state``'s headers, as bytes (rpm, its reset, tpm, its
    reset, budget, its reset)."""
    limits = state.limits
    state.roll(now)
    return (
        str(limits.rpm).encode(),
        _duration(state.requests.next_free(now)).encode(),
        str(limits.tpm).encode(),
        _duration(state.tokens.next_free(now)).encode(),
        str(limits.budget_tokens).encode(),
        _duration(max(0.0, state.period_end - now)).encode(),
    )


def estimate_tokens(body: bytes, doc: dict[str, Any]) -> int:
    """Tokens to reserve for a request: its prompt estimated from the body's size, plus the
    most it may generate (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``
    times ``n``; :data:`DEFAULT_MAX_TOKENS` when none is named)."""
    most = None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = doc.get(name)
        if type(value) is int and value >= 0:
            most = value
            break
    n = doc.get("n")
    choices = n if type(n) is int and 1 <= n <= 128 else 1
    most = DEFAULT_MAX_TOKENS if most is None else most
    return len(body) // BYTES_PER_TOKEN + 1 + most * choices
