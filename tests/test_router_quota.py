"""Leases of a key's quota across routers (llmlb.router.control.quota) and the shared-mode
admission against them (llmlb.router.proxy.admission), on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from llmlb.router import db
from llmlb.router.control import quota, usage
from llmlb.router.control.limits import parse_limits
from llmlb.router.proxy.admission import Admission, LimitExceeded, NeedLease


@pytest.fixture
def conn(db_target):
    connection = db.open_database(db_target)
    yield connection
    connection.close()


def test_grants_never_exceed_the_limit_in_a_sliding_minute(conn):
    granted = 0
    for router in ("a", "b") * 6:
        got, used, wait = quota.lease(conn, "k", quota.REQUESTS, 10, 1, 1000, router)
        granted += got
        assert used <= 10
    assert granted == 10  # slices of ceil(10/60) = 1 each, until the limit
    got, used, wait = quota.lease(conn, "k", quota.REQUESTS, 10, 1, 1030, "a")
    assert got == 0 and wait == pytest.approx(31.0)
    quota.adjust(conn, {("k", quota.REQUESTS, 1000): -3}, "a")  # a gives back 3 unused
    got, used, _ = quota.lease(conn, "k", quota.REQUESTS, 10, 3, 1030, "b")
    assert got == 3 and used == 10
    got, _, _ = quota.lease(conn, "k", quota.REQUESTS, 10, 1, 1061, "a")  # 1000 left
    assert got == 1


def test_an_oversized_need_is_granted_only_into_an_empty_window(conn):
    assert quota.lease(conn, "k", quota.TOKENS, 100, 500, 2000, "a")[0] == 500
    assert quota.lease(conn, "k", quota.TOKENS, 100, 500, 2001, "a")[0] == 0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _admit_with_leases(admission: Admission, conn, router: str, limits, estimate: int = 1):
    """What the proxy and runtime do together: admit, leasing on NeedLease."""
    for _ in range(3):
        try:
            return admission.admit("k", limits, "m", estimate)
        except NeedLease as need:
            for kind, limit, amount in need.needs:
                if kind == quota.BUDGET:
                    _lease_budget(admission, conn, router, limit, amount)
                    continue
                second = int(admission.clock())
                got, used, _ = quota.lease(conn, "k", kind, limit, amount, second, router)
                if not got:
                    raise LimitExceeded(429, "rate_limit_exceeded", "fleet") from None
                admission.granted("k", kind, second, got, used)
    raise AssertionError("no lease")


def _lease_budget(admission: Admission, conn, router: str, budget: int, total: int) -> None:
    """What the runtime does for a budget lease (Runtime._lease_budget)."""
    period, since, _, held = admission.budget_lease("k")
    got, _ = quota.lease_budget(conn, "k", period, since, budget, total - held, held, router)
    if not got:
        raise LimitExceeded(429, "insufficient_quota", "fleet")
    admission.budget_granted("k", period, got)


def test_two_routers_share_rpm_exactly_and_return_what_they_did_not_use(conn):
    clock = Clock(5000.2)
    a, b = Admission(clock, shared=True), Admission(clock, shared=True)
    limits = parse_limits({"rpm": 120, "tpm": 100_000})
    admitted = 0
    for i in range(300):
        try:
            _admit_with_leases(a if i % 2 else b, conn, "ra" if i % 2 else "rb", limits, 10)
            admitted += 1
        except LimitExceeded:
            pass
        if i % 50 == 49:
            clock.now += 1
            for admission, router in ((a, "ra"), (b, "rb")):
                quota.adjust(conn, admission.drain_adjustments(), router)
    assert admitted == 120
    clock.now += 61  # a new minute: room again
    _admit_with_leases(a, conn, "ra", limits, 10)


def test_shared_tokens_settle_back_into_the_lease(conn):
    clock = Clock(7000.0)
    admission = Admission(clock, shared=True)
    limits = parse_limits({"tpm": 6000})  # slices of 100
    ticket = _admit_with_leases(admission, conn, "r", limits, 80)
    lease = admission.states["k"].leases[quota.TOKENS]
    assert lease.left == 20
    admission.settle(ticket, 30)  # 50 unused, same second: reusable at once
    assert lease.left == 70
    ticket = _admit_with_leases(admission, conn, "r", limits, 50)
    clock.now += 1
    admission.settle(ticket, 90)  # 40 more than reserved, a second later: charged in the batch
    assert admission.drain_adjustments() == {("k", quota.TOKENS, 7000): 40}


DAY_START = 1_796_601_600.0  # 2026-12-07 00:00 UTC


def test_budget_leases_stop_at_the_budget_and_count_the_usage_before_them(conn):
    usage.flush(conn, {(int(DAY_START) + 60, "k", "m", "n"): [1, 30, 0, 10, 0]})
    since = DAY_START
    got, leased = quota.lease_budget(conn, "k", "2026-12-07", since, 640, 5, 0, "a")
    assert (got, leased) == (10, 50)  # the 40 used before the first lease, then a slice
    got, leased = quota.lease_budget(conn, "k", "2026-12-07", since, 640, 600, 0, "b")
    assert (got, leased) == (600, 650)  # what it needs, crossing the budget once
    assert quota.lease_budget(conn, "k", "2026-12-07", since, 640, 1, 0, "b")[0] == 0
    # a holds 10: the leases less what a holds (640) are not below the budget either
    assert quota.lease_budget(conn, "k", "2026-12-07", since, 640, 5, 10, "a")[0] == 0
    quota.adjust_budgets(conn, {("k", "2026-12-07"): -100}, "b")  # b gives back 100
    got, leased = quota.lease_budget(conn, "k", "2026-12-07", since, 640, 5, 0, "a")
    assert (got, leased) == (10, 560)
    # the next day: the old period's rows go, nothing was used yet
    assert quota.lease_budget(conn, "k", "2026-12-08", since + 86400, 640, 5, 0, "a") == (10, 10)
    rows = conn.execute("SELECT DISTINCT period FROM budget_leases").fetchall()
    assert [r[0] for r in rows] == ["2026-12-08"]


def test_two_routers_share_a_budget_and_give_back_what_they_hold(conn):
    clock = Clock(DAY_START + 3600)
    a, b = Admission(clock, shared=True), Admission(clock, shared=True)
    limits = parse_limits({"budget_tokens": 6400, "budget_period": "day"})  # slices of 100
    tickets = []
    refused = {"a": 0, "b": 0}
    for i in range(400):
        admission, router = (a, "a") if i % 2 else (b, "b")
        try:
            tickets.append((admission, _admit_with_leases(admission, conn, router, limits, 30)))
        except LimitExceeded as exc:
            assert exc.code == "insufficient_quota"
            refused[router] += 1
    assert refused["a"] and refused["b"]
    reserved = 30 * len(tickets)
    # At most the request that crossed the budget beyond it; short of it at most what each
    # router holds, less than one request.
    assert 6400 - 2 * 30 < reserved <= 6400 + 30
    for admission, ticket in tickets:
        admission.settle(ticket, 20)  # each used 10 less than it reserved
    held = a.states["k"].budget_held + b.states["k"].budget_held
    assert held == 10 * len(tickets)
    for admission, router in ((a, "a"), (b, "b")):
        admission.release_budgets()  # shutdown: what it holds goes back
        quota.adjust_budgets(conn, admission.drain_budget_adjustments(), router)
        assert admission.states["k"].budget_held == 0
    row = conn.execute("SELECT SUM(amount) FROM budget_leases").fetchone()
    assert int(row[0]) == 20 * len(tickets)
    # the fleet may lease again what came back
    assert _admit_with_leases(a, conn, "a", limits, 30).reserved == 30


def test_a_budget_request_using_more_than_it_reserved_is_charged_and_idle_leases_return(conn):
    clock = Clock(DAY_START + 7200)
    admission = Admission(clock, shared=True)
    limits = parse_limits({"budget_tokens": 64_000, "budget_period": "day"})  # slices of 1000
    ticket = _admit_with_leases(admission, conn, "r", limits, 50)
    state = admission.states["k"]
    assert state.budget_held == 950 and ticket.period == "2026-12-07"
    admission.settle(ticket, 80)  # 30 more than reserved: out of the lease
    assert state.budget_held == 920 and admission.drain_budget_adjustments() == {}
    state.budget_held = 10
    ticket = _admit_with_leases(admission, conn, "r", limits, 10)
    admission.settle(ticket, 25)  # 15 more and nothing held: charged in the batch
    assert admission.drain_budget_adjustments() == {("k", "2026-12-07"): 15}
    state.budget_held = 500
    admission.release_budgets(5.0)  # reserved just now: kept
    assert admission.drain_budget_adjustments() == {}
    clock.now += 5
    admission.release_budgets(5.0)
    assert admission.drain_budget_adjustments() == {("k", "2026-12-07"): -500}
    clock.now += 86400  # the next period: a lease of the old one lapses
    state.budget_held = 7
    assert admission.lacking("k", quota.BUDGET, 1) and state.budget_held == 0


def test_lapsed_budget_leases_are_dropped_a_month_later(conn):
    for period in ("2026-10-31", "2026-11", "2026-11-01", "2026-12-07"):
        quota.lease_budget(conn, period, period, DAY_START - 90 * 86400, 640, 5, 0, "a")
    # only before November: the seed row (router '') and a's of 2026-10-31
    assert quota.drop_lapsed_budgets(conn, DAY_START) == 2
    rows = conn.execute("SELECT DISTINCT period FROM budget_leases ORDER BY period").fetchall()
    assert [r[0] for r in rows] == ["2026-11", "2026-11-01", "2026-12-07"]
