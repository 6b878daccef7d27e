"""Sync notifications: the backoff schedule, and the notifier against a node stand-in."""

from __future__ import annotations

import asyncio

import orjson
from llmlb.router import db
from llmlb.router.control import nodes
from llmlb.router.control.settings import RouterSettings
from llmlb.router.control.sync import SyncNotifier, backoff_delay

from tests.procs import wait_until
from tests.router_fixtures import NodeStandin


def test_backoff_schedule_doubles_to_the_cap():
    assert [backoff_delay(i, 1.0, 60.0) for i in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(10_000, 1.0, 60.0) == 60.0


def test_notifier_retries_until_delivered(tmp_path, db_target):
    settings = RouterSettings(
        home=tmp_path, db_path=tmp_path / "lb.db", sync_backoff_base_s=0.01, sync_backoff_max_s=0.02
    )

    async def scenario(standin: NodeStandin) -> int:
        database = db.Database(db_target)
        await database.open()
        reg = nodes.Registration.parse({"node_id": "n", "url": standin.url})
        token = await database.run(nodes.register, reg)
        notifier = SyncNotifier(settings, database)
        await notifier.start()
        notifier.notify(["n"], ["org/a"], "register")
        notifier.notify(["n"], ["org/a"], "delete")
        await asyncio.to_thread(wait_until, lambda: len(standin.arrivals) >= 5, 10)
        await asyncio.to_thread(wait_until, lambda: notifier.pending("n") == 0, 10)
        await notifier.close()
        await database.close()
        assert all(a.headers["authorization"] == f"Bearer {token}" for a in standin.arrivals)
        return len(standin.arrivals)

    with NodeStandin(failures=3) as standin:
        assert asyncio.run(scenario(standin)) == 5
    bodies = [orjson.loads(a.body) for a in standin.arrivals]
    assert bodies[3] == {"models": ["org/a"], "action": "register"}  # in order, after retries
    assert bodies[4] == {"models": ["org/a"], "action": "delete"}
