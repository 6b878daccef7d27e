"""The workers of one router share their prefix indexes over the index bus: a report one
worker applies reaches the others in order, and a lost one makes every worker ask the node
for a snapshot."""

from __future__ import annotations

import asyncio
import socket
import stat

from llmlb.prefix_keys import CacheReport
from llmlb.router.proxy.index_bus import IndexBus
from llmlb.router.proxy.prefix_index import PrefixIndex, ReportResult

MODEL = "org/model"
NODE = "node-a"
CHAIN = [(101, 10), (202, 20), (303, 30)]


def _report(seq: int, snapshot: bool = False, stored=(), removed=()) -> CacheReport:
    return CacheReport("epoch-1", seq, snapshot, {MODEL: list(stored)}, {MODEL: list(removed)})


def _workers(tmp_path, count: int) -> list[IndexBus]:
    buses = [IndexBus(tmp_path, PrefixIndex(), name=f"w{i}") for i in range(count)]
    for bus in buses:
        bus.start()
    return buses


def _direct(bus: IndexBus, report: CacheReport) -> ReportResult:
    """What the route does with a report that reached ``bus``'s worker."""
    bus.drain()
    if not report.snapshot and bus.take_resync(NODE):
        bus.index.forget(NODE)
    result = bus.index.apply(NODE, report)
    if result is ReportResult.OK:
        bus.applied(NODE, report)
    return result


def _holds(bus: IndexBus) -> int:
    return bus.index.longest(MODEL, CHAIN, [NODE]).get(NODE, 0)


def test_reports_applied_by_any_worker_reach_every_worker_in_order(tmp_path):
    async def scenario() -> None:
        a, b, c = _workers(tmp_path, 3)
        try:
            assert _direct(a, _report(1, True, stored=[101])) is ReportResult.OK
            assert _direct(b, _report(2, stored=[202])) is ReportResult.OK  # after a's
            assert _direct(c, _report(3, stored=[303], removed=[101])) is ReportResult.OK
            for bus in (a, b, c):
                bus.drain()
                assert _holds(bus) == 30, bus.path
                assert bus.index.keys_held(NODE) == 2
            assert stat.S_ISSOCK((tmp_path / "w0.sock").stat().st_mode)
        finally:
            for bus in (a, b, c):
                bus.close()
        assert not list(tmp_path.glob("*.sock"))

    asyncio.run(scenario())


def test_a_lost_report_makes_every_worker_refuse_the_next_delta_until_a_snapshot(tmp_path):
    async def scenario() -> None:
        a, b = _workers(tmp_path, 2)
        try:
            assert _direct(a, _report(1, True, stored=[101])) is ReportResult.OK
            a.applied(NODE, _report(3, stored=[303]))  # seq 2 never reached b: a gap there
            b.drain()
            assert _holds(b) == 0  # b forgot the node and asked for a snapshot
            assert _direct(a, _report(4, stored=[202])) is ReportResult.RESYNC
            assert _direct(a, _report(1, True, stored=[101, 202])) is ReportResult.OK
            b.drain()
            assert _holds(a) == _holds(b) == 20
            assert _direct(b, _report(2, stored=[303])) is ReportResult.OK  # no refusal left
            a.drain()
            assert _holds(a) == 30
        finally:
            a.close()
            b.close()

    asyncio.run(scenario())


def test_a_gone_workers_socket_is_cleared_and_costs_nothing(tmp_path):
    async def scenario() -> None:
        (a,) = _workers(tmp_path, 1)
        stale = tmp_path / "w9.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dead.bind(str(stale))
        dead.close()  # bound, then gone: sends to it are refused
        try:
            assert _direct(a, _report(1, True, stored=[101])) is ReportResult.OK
            assert not stale.exists() and a.dropped == 0
        finally:
            a.close()

    asyncio.run(scenario())


def test_a_system_that_cannot_carry_a_large_report_leaves_the_bus_off(tmp_path):
    async def scenario() -> None:
        bus = IndexBus(tmp_path, PrefixIndex(), name="w0")
        assert not bus.start(probe_bytes=64 << 20)  # over any datagram limit
        assert not list(tmp_path.glob("*.sock"))
        bus.applied(NODE, _report(1, True, stored=[101]))  # a closed bus sends nothing
        bus.close()

    asyncio.run(scenario())
