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
                if kind == quota.PARALLEL:
                    _lease_slots(admission, conn, router, limit)
                    continue
                second = int(admission.clock())
                got, used, _ = quota.lease(conn, "k", kind, limit, amount, second, router)
                if not got:
                    raise LimitExceeded(429, "rate_limit_exceeded", "fleet") from None
                admission.granted("k", kind, second, got, used)
    raise AssertionError("no lease")


def _lease_slots(admission: Admission, conn, router: str, limit: int) -> None:
    """What the runtime does for parallel slots (Runtime._lease_slots)."""
    held = admission.slots_held("k")
    need = admission.states["k"].inflight + 1 - held
    now = admission.clock()
    got = quota.lease_parallel(conn, "k", limit, need, held, now, router)
    if not got:
        raise LimitExceeded(429, "rate_limit_exceeded", "fleet")
    admission.slots_granted("k", held + got, now)


def _renew(admission: Admission, conn, router: str, idle_s: float = 3.0) -> None:
    """What the runtime's batch does with parallel slots (Runtime.renew_slots)."""
    held = admission.slots_to_renew(idle_s)
    if held is None:
        return
    now = admission.clock()
    alive, wanted = quota.renew_parallel(conn, held, now, router)
    admission.slots_renewed(alive, now)
    quota.give_back_parallel(conn, admission.give_back_wanted(wanted), router)


def _slots_in_db(conn, now: float) -> dict[str, int]:
    rows = conn.execute(
        "SELECT router, amount FROM parallel_leases WHERE key_id = 'k' AND expires_at > ?",
        (now,),
    ).fetchall()
    return {row[0]: int(row[1]) for row in rows if int(row[1])}


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


# -- parallel slots -------------------------------------------------------------------------


def test_parallel_slots_are_granted_while_the_fleet_holds_at_most_max_parallel(conn):
    now = 9000.0
    assert quota.lease_parallel(conn, "k", 4, 1, 0, now, "a") == 1  # slices of ceil(4/8) = 1
    assert quota.lease_parallel(conn, "k", 4, 2, 1, now, "a") == 2  # a holds 3 now
    assert quota.lease_parallel(conn, "k", 4, 2, 0, now, "b") == 0  # only 1 left: refused
    assert quota.lease_parallel(conn, "k", 4, 1, 0, now, "b") == 1
    assert quota.lease_parallel(conn, "k", 4, 1, 3, now, "a") == 0
    assert _slots_in_db(conn, now) == {"a": 3, "b": 1}
    assert quota.lease_parallel(conn, "k", 16, 1, 0, now, "c") == 2  # slices of 16/8
    wanted = conn.execute(
        "SELECT router, wanted_at FROM parallel_leases WHERE wanted_at IS NOT NULL"
    ).fetchall()
    assert [(row[0], float(row[1])) for row in wanted] == [("a", now)]  # refused last


def test_a_dead_routers_slots_return_when_its_lease_expires(conn):
    now = 9100.0
    assert quota.lease_parallel(conn, "k", 2, 2, 0, now, "dead") == 2
    assert quota.lease_parallel(conn, "k", 2, 1, 0, now + quota.PARALLEL_TTL_S - 0.1, "b") == 0
    # never renewed: expired at now + TTL, its row deleted by the next lease
    later = now + quota.PARALLEL_TTL_S
    assert quota.lease_parallel(conn, "k", 2, 1, 0, later, "b") == 1
    routers = [row[0] for row in conn.execute("SELECT router FROM parallel_leases")]
    assert routers == ["b"]
    assert quota.drop_expired_parallel(conn, later + quota.PARALLEL_TTL_S) == 1


def test_renewal_keeps_slots_and_gives_back_idle_ones(conn):
    clock = Clock(9200.0)
    a, b = Admission(clock, shared=True), Admission(clock, shared=True)
    limits = parse_limits({"max_parallel": 2})
    first = _admit_with_leases(a, conn, "a", limits)
    second = _admit_with_leases(a, conn, "a", limits)
    with pytest.raises(LimitExceeded):  # a holds both: b may not start a third
        _admit_with_leases(b, conn, "b", limits)
    for _ in range(12):  # renewed every second: a's slots outlive the TTL
        clock.now += 1
        _renew(a, conn, "a")
    assert _slots_in_db(conn, clock.now) == {"a": 2} and a.slots_held("k") == 2
    a.settle(first, 5)  # the end of a request frees its slot here, no write
    assert _slots_in_db(conn, clock.now) == {"a": 2}
    clock.now += 2.9
    _renew(a, conn, "a")  # idle for less than PARALLEL_IDLE_S: kept
    assert _slots_in_db(conn, clock.now) == {"a": 2}
    clock.now += 0.1
    _renew(a, conn, "a")
    assert _slots_in_db(conn, clock.now) == {"a": 1} and a.slots_held("k") == 1
    _admit_with_leases(b, conn, "b", limits)  # the slot a gave back
    a.settle(second, 5)
    _renew(a, conn, "a", idle_s=0.0)  # shutdown: every free slot goes back
    assert _slots_in_db(conn, clock.now) == {"b": 1} and a.slots_held("k") == 0


def test_a_slot_idle_on_one_router_goes_to_the_router_that_wants_it(conn):
    clock = Clock(9300.0)
    a, b = Admission(clock, shared=True), Admission(clock, shared=True)
    limits = parse_limits({"max_parallel": 3})
    tickets = [_admit_with_leases(a, conn, "a", limits) for _ in range(3)]
    for ticket in tickets[:2]:
        a.settle(ticket, 5)  # two slots free on a, not yet idle long enough
    with pytest.raises(LimitExceeded):
        _admit_with_leases(b, conn, "b", limits)  # refused: b now wants one
    clock.now += 1
    _renew(a, conn, "a")  # a's next batch: b wants the key, a's free slots go back
    assert a.slots_held("k") == 1 and _slots_in_db(conn, clock.now) == {"a": 1}
    _admit_with_leases(b, conn, "b", limits)
    _admit_with_leases(b, conn, "b", limits)
    with pytest.raises(LimitExceeded):  # 1 on a, 2 on b: the fleet is full
        _admit_with_leases(b, conn, "b", limits)
    with pytest.raises(LimitExceeded):
        _admit_with_leases(a, conn, "a", limits)


def test_a_router_that_cannot_renew_holds_nothing_before_its_slots_expire(conn):
    clock = Clock(9400.0)
    a, b = Admission(clock, shared=True), Admission(clock, shared=True)
    limits = parse_limits({"max_parallel": 2})
    ticket = _admit_with_leases(a, conn, "a", limits)
    _admit_with_leases(a, conn, "a", limits)  # a holds 2: b is refused
    a.settle(ticket, 5)
    # The database is lost to a: no renewal. Until TTL - margin a admits on what it holds.
    clock.now += quota.PARALLEL_TTL_S - quota.PARALLEL_MARGIN_S - 0.1
    late = a.admit("k", limits, "m", 1)
    with pytest.raises(LimitExceeded):  # both in flight on a: the local cap
        a.admit("k", limits, "m", 1)
    clock.now += 0.1
    assert a.slots_held("k") == 0  # lapsed here, while still valid in the database
    assert _slots_in_db(conn, clock.now) == {"a": 2}
    a.settle(late, 5)
    with pytest.raises(NeedLease):  # it must lease (the runtime refuses without a database)
        a.admit("k", limits, "m", 1)
    with pytest.raises(LimitExceeded):
        _admit_with_leases(b, conn, "b", limits)
    clock.now += quota.PARALLEL_MARGIN_S  # expired in the database: b may have them
    _admit_with_leases(b, conn, "b", limits)
    # a's database is back: its batch finds its row expired and holds nothing; its request
    # in flight must be covered before another starts there.
    _renew(a, conn, "a")
    assert a.slots_held("k") == 0
    with pytest.raises(LimitExceeded):
        _admit_with_leases(a, conn, "a", limits)


def test_slots_of_a_key_whose_max_parallel_was_removed_go_back(conn):
    clock = Clock(9500.0)
    admission = Admission(clock, shared=True)
    ticket = _admit_with_leases(admission, conn, "a", parse_limits({"max_parallel": 2}))
    assert _slots_in_db(conn, clock.now) == {"a": 1}
    admission.state("k", parse_limits({"rpm": 10**6}))  # PATCH: max_parallel null
    _renew(admission, conn, "a")
    assert _slots_in_db(conn, clock.now) == {} and admission.slots_held("k") == 0
    admission.settle(ticket, 5)
