"""Leases of a key's per-minute quota, for routers sharing one PostgreSQL database.

Each router takes a key's ``rpm`` (``requests``) and ``tpm`` (``tokens``) in small slices:
:func:`lease` grants at most what keeps the sum of every router's grants of the last 61
one-second buckets (a full minute after any moment of the oldest) within the limit, recorded
at the current second (``quota_grants``: one row per key, kind, second and router). A router
admits requests only against what it was granted in the current second; at the next second
it returns what it did not use, and it returns (or adds) the difference between a request's
reserved and reported tokens, both in its once-a-second batch (:func:`adjust`). So no
60-second span is granted more than the limit fleet-wide, the database sees one write per
slice and one batch per second, never one per request, and a router that lost the database
admits only what it already holds.

Overshoot: none for ``rpm`` beyond the routers' clock skew (a skew of *d* seconds may admit
*d* seconds' worth more); for ``tpm`` the tokens requests use beyond what they reserved
(reserved: prompt estimate + ``max_tokens``) until the batch charges it: the requests in
flight and those that ended since the last batch. ``bench/tenancy`` (two routers, 8 clients,
``tpm`` 30 000): 99.9 % of the limit in any minute when requests reserve more than they use,
102.3 % when each uses 9 tokens more than it reserved.

Budgets (``budget_tokens`` per ``budget_period``) are leased per period instead
(``budget_leases``: one row per key, period and router, net of what was given back, plus
router ``''`` with the usage written for the period before its first lease):
:func:`lease_budget` grants a slice of ``budget`` / :data:`BUDGET_SLICES` (at least what the
request needs) while the period's leases, less what the asking router holds, are below the
budget; the router admits against what it holds, puts a request's unused reservation back
into it and takes what a request used beyond its reservation out of it (the rest charged in
the batch, :func:`adjust_budgets`). An idle lease (no reservation for 5 s) and a closing
router's lease go back in the batch; at the period's end a lease lapses (its rows go at
the key's next lease, or a month later, :func:`drop_lapsed_budgets`); a SIGKILLed
router's lease (less than a slice + one reservation) is lost to the period. A router that
lost the database keeps what it holds and admits only against it (then 429
``rate_limit_exceeded``, ``Retry-After`` 1 s); one whose lease the fleet cannot refill (the
budget is leased out) refuses with 429 ``insufficient_quota``, ``Retry-After`` the period's
end.

Overshoot of a budget: the fleet's leases never exceed the budget by more than the
reservation of the request that crossed it, so the tokens given are at most the budget + one
request's reservation + what requests use beyond their reservation: the rule of one router
without leases (admit while spent + reserved < budget), now fleet-wide. Short of the budget:
a router may be refused while others hold unused slices (each less than a slice + one
reservation) until they use them or give them back. ``bench/tenancy`` (two routers, 8
clients, requests reserving 43 tokens and using 21): 5 019 of a 5 000 budget and 50 001 of
50 000 given in every run (1.0038x, 1.00002x; the bound 5 043 and 50 043), where reading
back each other's usage once a second had given 2.0x and 1.19-1.33x.

Parallel slots (``max_parallel``) are leased per key and router (``parallel_leases``: the
slots a router holds and until when, ``expires_at``): a router admits a request while it
holds more slots than it has requests of the key in flight, and a request's end frees its
slot there, no write. Short, it asks :func:`lease_parallel` for a slice
(:func:`parallel_slice`: max_parallel / 8, at least 1), granted while every router's
unexpired slots stay within ``max_parallel``; refused, its row records ``wanted_at`` and
the request is 429 ``rate_limit_exceeded``, ``Retry-After`` 1 s (for 0.25 s after a
refusal the router refuses the key without asking again). Once a second each router renews
all its rows to now + :data:`PARALLEL_TTL_S` (10 s) in one statement
(:func:`renew_parallel`), gives back slots free for 3 s, and at once those of keys another
router wanted in the last :data:`PARALLEL_WANTED_S`; so a slot idle on one router blocks
another for about a second. At shutdown it gives back every free slot; a SIGKILLed
router's slots come back when they expire (10 s at most); expired rows are deleted by the
next lease of the key and hourly by the leader (:func:`drop_expired_parallel`). A router
that cannot renew (lost the database) holds nothing once :data:`PARALLEL_TTL_S` -
:data:`PARALLEL_MARGIN_S` (7 s, its own clock) passed since its last renewal, before the
database can count its slots expired, and refuses whatever its slots do not cover.

Bound for ``max_parallel``: the fleet never has more than ``max_parallel`` requests of a
key in flight, as long as the routers' clocks agree within :data:`PARALLEL_MARGIN_S` (3 s;
one whose clock runs further ahead may count another's slots expired while they are used).
One exception: a router cut off from the database keeps its running requests (it starts no
new one once its slots lapsed), so those still running :data:`PARALLEL_TTL_S` after its
last renewal may overlap the slots other routers lease after the expiry. One router on
SQLite with one worker does not lease: exact. ``bench/tenancy`` (two routers, 8 clients
retrying at once, ``max_parallel`` 4, a backend answering after 200 ms): see its README.
"""

from __future__ import annotations

import math
import time

from llmlb.router import db
from llmlb.router.control import usage

WINDOW_S = 61  # one-second buckets: a grant of second s counts until s + 61 (see admission)
REQUESTS = "requests"
TOKENS = "tokens"
# A slice is this fraction of the per-minute limit (at least what the request needs).
SLICES_PER_MINUTE = 60


def slice_size(limit: int, need: int) -> int:
    """How much to ask for at once: a second's share of the limit, at least ``need``."""
    return max(need, math.ceil(limit / SLICES_PER_MINUTE))


def lease(
    conn: db.Conn,
    key_id: str,
    kind: str,
    limit: int,
    need: int,
    second: int,
    router: str,
) -> tuple[int, int, float]:
    """Grant ``router`` part of ``key_id``'s ``kind`` quota at ``second``.

    Returns:
        ``(granted, used, retry_after)``: ``granted`` is 0 when the window has less than
        ``need`` left (a need larger than the whole limit is granted when the window is
        empty); ``used`` is the fleet's grants in the window after this one; ``retry_after``
        the seconds until enough leaves the window when nothing was granted.
    """
    with db.transaction(conn):
        rows = conn.execute(
            "SELECT second, SUM(amount) FROM quota_grants WHERE key_id = ? AND kind = ? "
            "AND second > ? GROUP BY second ORDER BY second",
            (key_id, kind, second - WINDOW_S),
        ).fetchall()
        used = sum(int(row[1] or 0) for row in rows)
        left = limit - used
        if left >= need or (used <= 0 and need > limit):
            granted = min(max(left, need), slice_size(limit, need))
            conn.execute(
                "INSERT INTO quota_grants (key_id, kind, second, router, amount) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, kind, second, router) "
                "DO UPDATE SET amount = quota_grants.amount + excluded.amount",
                (key_id, kind, second, router, granted),
            )
            conn.execute(
                "DELETE FROM quota_grants WHERE key_id = ? AND kind = ? AND second <= ?",
                (key_id, kind, second - WINDOW_S),
            )
            return granted, used + granted, 0.0
        freed = 0
        excess = need - left
        for row in rows:
            freed += int(row[1] or 0)
            if freed >= excess:
                return 0, used, float(int(row[0]) + WINDOW_S - second)
        return 0, used, float(WINDOW_S)


Adjustments = dict[tuple[str, str, int], int]  # (key_id, kind, second) -> amount to add


def adjust(conn: db.Conn, changes: Adjustments, router: str) -> None:
    """Apply a second's returns (negative) and extra charges (positive) to this router's
    grants; rows that left the window are not touched."""
    if not changes:
        return
    with db.transaction(conn):
        conn.executemany(
            "INSERT INTO quota_grants (key_id, kind, second, router, amount) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, kind, second, router) "
            "DO UPDATE SET amount = MAX(quota_grants.amount + excluded.amount, 0)"
            if db.dialect_of(conn) == db.SQLITE
            else "INSERT INTO quota_grants (key_id, kind, second, router, amount) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, kind, second, router) "
            "DO UPDATE SET amount = GREATEST(quota_grants.amount + excluded.amount, 0)",
            [
                (key_id, kind, second, router, amount)
                for (key_id, kind, second), amount in changes.items()
                if amount
            ],
        )


# -- budgets ---------------------------------------------------------------------------------

BUDGET = "budget"
# A budget slice is this fraction of the budget (at least what the request needs).
BUDGET_SLICES = 64


def budget_slice(budget: int, need: int) -> int:
    """How much of a budget to lease at once: ``budget`` / :data:`BUDGET_SLICES`, at least
    ``need``."""
    return max(need, math.ceil(budget / BUDGET_SLICES))


def lease_budget(
    conn: db.Conn,
    key_id: str,
    period: str,
    since: float,
    budget: int,
    need: int,
    held: int,
    router: str,
) -> tuple[int, int]:
    """Lease ``router`` part of ``key_id``'s ``budget`` for ``period`` (its label; it began
    at ``since``), ``router`` holding ``held`` unused and lacking ``need`` more.

    The grant is made while the period's leases, less what the asking router holds, are
    below the budget (one router: while spent + reserved < budget, the rule of a router that
    leases nothing); it is a slice (:func:`budget_slice`) capped by what is left, at least
    ``need``. So the fleet's leases never exceed the budget by more than the reservation of
    the request that crossed it. The first lease of a period counts the usage stored for it
    before (router ``''``); rows of older periods of the key are deleted.

    Returns:
        ``(granted, leased)``: ``granted`` 0 when the budget is used up (leased); ``leased``
        the period's leases fleet-wide after this one.
    """
    with db.transaction(conn):
        conn.execute("DELETE FROM budget_leases WHERE key_id = ? AND period < ?", (key_id, period))
        row = conn.execute(
            "SELECT COUNT(*), SUM(amount) FROM budget_leases WHERE key_id = ? AND period = ?",
            (key_id, period),
        ).fetchone()
        leased = int(row[1] or 0)
        if not row[0]:
            leased = usage.spent(conn, [key_id], since).get(key_id, 0)
            conn.execute(
                "INSERT INTO budget_leases (key_id, period, router, amount) VALUES (?, ?, '', ?)",
                (key_id, period, leased),
            )
        if leased - held >= budget:
            return 0, leased
        granted = max(need, min(budget_slice(budget, need), budget - leased))
        conn.execute(
            "INSERT INTO budget_leases (key_id, period, router, amount) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (key_id, period, router) "
            "DO UPDATE SET amount = budget_leases.amount + excluded.amount",
            (key_id, period, router, granted),
        )
        return granted, leased + granted


BudgetChanges = dict[tuple[str, str], int]  # (key_id, period) -> amount to add


def adjust_budgets(conn: db.Conn, changes: BudgetChanges, router: str) -> None:
    """Apply returns (negative) and extra charges (positive: tokens used beyond the
    reservations) to this router's budget leases; a period whose rows are gone is skipped."""
    params = [
        (amount, key_id, period, router) for (key_id, period), amount in changes.items() if amount
    ]
    if not params:
        return
    with db.transaction(conn):
        conn.executemany(
            "UPDATE budget_leases SET amount = amount + ? "
            "WHERE key_id = ? AND period = ? AND router = ?",
            params,
        )


def drop_lapsed_budgets(conn: db.Conn, now: float) -> int:
    """Delete the budget leases of periods before the previous calendar month (UTC), whatever
    the key (:func:`lease_budget` deletes a key's older periods only when it leases again);
    returns the rows removed. A month back, so a router whose clock lags cannot lose the
    rows of a period it still leases."""
    cutoff = time.strftime("%Y-%m", time.gmtime(now - 32 * 86400))
    with db.transaction(conn):
        removed = conn.execute("DELETE FROM budget_leases WHERE period < ?", (cutoff,)).rowcount
    return max(0, removed or 0)


# -- parallel slots --------------------------------------------------------------------------

PARALLEL = "parallel"
# A router's slots are valid in the database this long after their last renewal (or grant).
PARALLEL_TTL_S = 10.0
# A router stops using its slots this long before they can have expired in the database
# (its own clock: no successful renewal for TTL - margin and it holds none).
PARALLEL_MARGIN_S = 3.0
# A refusal marks the key wanted this long: routers holding idle slots of it give them back.
PARALLEL_WANTED_S = 3.0
# A parallel slice is this fraction of max_parallel (at least what the request needs).
PARALLEL_SLICES = 8


def parallel_slice(limit: int, need: int) -> int:
    """How many parallel slots to lease at once: ``limit`` / :data:`PARALLEL_SLICES`, at
    least ``need``."""
    return max(need, math.ceil(limit / PARALLEL_SLICES))


def lease_parallel(
    conn: db.Conn, key_id: str, limit: int, need: int, held: int, now: float, router: str
) -> int:
    """Lease ``router`` ``need`` or more parallel slots of ``key_id`` (``limit``: its
    ``max_parallel``), ``router`` holding ``held``.

    Granted only while the unexpired slots of every other router plus ``held`` plus the grant
    stay within ``limit``; the router's row then holds ``held`` + the grant until ``now`` +
    :data:`PARALLEL_TTL_S`. Refused, the router's row records ``wanted_at`` (routers holding
    idle slots of the key give them back at their next batch, :func:`renew_parallel`).
    Expired rows of the key are deleted.

    Returns:
        the slots granted (0: refused).
    """
    expires = now + PARALLEL_TTL_S
    with db.transaction(conn):
        conn.execute(
            "DELETE FROM parallel_leases WHERE key_id = ? AND expires_at <= ?", (key_id, now)
        )
        row = conn.execute(
            "SELECT SUM(amount) FROM parallel_leases WHERE key_id = ? AND router <> ?",
            (key_id, router),
        ).fetchone()
        left = limit - int(row[0] or 0) - held
        granted = min(left, parallel_slice(limit, need)) if left >= need else 0
        conn.execute(
            "INSERT INTO parallel_leases (key_id, router, amount, expires_at, wanted_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, router) DO UPDATE SET "
            "amount = excluded.amount, expires_at = excluded.expires_at, "
            "wanted_at = excluded.wanted_at",
            (key_id, router, held + granted, expires, None if granted else now),
        )
        return granted


def renew_parallel(
    conn: db.Conn, held: dict[str, int], now: float, router: str
) -> tuple[dict[str, int], set[str]]:
    """The once-a-second batch of ``router``'s parallel slots: renew every unexpired row of
    it until ``now`` + :data:`PARALLEL_TTL_S` (one statement), bring rows holding more than
    ``held`` (``{key_id: slots held}``; slots given back) down to it, and read which keys
    other routers want.

    Returns:
        ``(alive, wanted)``: the slots of each key renewed (what the router holds now) and
        the keys of ``held`` another router was refused in the last
        :data:`PARALLEL_WANTED_S`.
    """
    with db.transaction(conn):
        rows = conn.execute(
            "UPDATE parallel_leases SET expires_at = ? "
            "WHERE router = ? AND expires_at > ? AND amount > 0 RETURNING key_id, amount",
            (now + PARALLEL_TTL_S, router, now),
        ).fetchall()
        alive: dict[str, int] = {}
        fixes = []
        for key_id, amount in rows:
            mine = held.get(key_id, 0)
            if int(amount) > mine:
                fixes.append((mine, key_id, router))
            if mine:
                alive[key_id] = min(int(amount), mine)
        if fixes:
            conn.executemany(
                "UPDATE parallel_leases SET amount = ? WHERE key_id = ? AND router = ?", fixes
            )
        wanted = set()
        if alive:
            wanted = {
                row[0]
                for row in conn.execute(
                    "SELECT DISTINCT key_id FROM parallel_leases "
                    "WHERE router <> ? AND wanted_at > ?",
                    (router, now - PARALLEL_WANTED_S),
                )
                if row[0] in alive
            }
    return alive, wanted


def give_back_parallel(conn: db.Conn, held: dict[str, int], router: str) -> None:
    """Set ``router``'s slots of each key of ``held`` to what it still holds (less than
    before: the idle slots given back)."""
    if held:
        with db.transaction(conn):
            conn.executemany(
                "UPDATE parallel_leases SET amount = ? WHERE key_id = ? AND router = ?",
                [(amount, key_id, router) for key_id, amount in held.items()],
            )


def drop_expired_parallel(conn: db.Conn, now: float) -> int:
    """Delete every expired parallel lease (those of keys nobody leases again, and of
    routers that died); returns the rows removed."""
    with db.transaction(conn):
        removed = conn.execute(
            "DELETE FROM parallel_leases WHERE expires_at <= ?", (now,)
        ).rowcount
    return max(0, removed or 0)
