"""Leases of a key's quota across routers (llmlb.router.control.quota) and the shared-mode
admission against them (llmlb.router.proxy.admission), on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from llmlb.router import db
from llmlb.router.control import quota
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
                second = int(admission.clock())
                got, used, _ = quota.lease(conn, "k", kind, limit, amount, second, router)
                if not got:
                    raise LimitExceeded(429, "rate_limit_exceeded", "fleet") from None
                admission.granted("k", kind, second, got, used)
    raise AssertionError("no lease")


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
