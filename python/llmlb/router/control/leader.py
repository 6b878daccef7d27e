"""The fleet's background duties, done by one router (the leader) at a time.

Duties: delivering the sync notifications queued in the outbox (with their retries), and
marking silent nodes offline. Every worker of every router runs :meth:`Duties.tick`; only
the one whose database says it leads (:meth:`llmlb.router.db.Database.lead`: a PostgreSQL
advisory lock on the worker's listener connection, or an ``flock`` on ``lb.db.leader``)
does anything. When the leader dies its lock goes with its connection (or process), the
next worker to ask takes it, and picks the outbox up where the dead one left it.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Gauge

from llmlb.router.control import nodes, outbox
from llmlb.router.control.settings import RouterSettings
from llmlb.router.control.sync import SyncNotifier
from llmlb.router.db import Database

logger = logging.getLogger("llmlb.router.control.leader")

LEADER = Gauge(
    "llmlb_router_leader",
    "1 while this router runs the fleet's background duties (sync notifications, offline "
    "marking), else 0.",
    multiprocess_mode="livemax",
)


class Duties:
    """One worker's share of the fleet's background work.

    Args:
        settings: offline threshold.
        db: the database (leadership, outbox, nodes).
        notifier: the sender the outbox is fed to while leading.
    """

    def __init__(self, settings: RouterSettings, db: Database, notifier: SyncNotifier):
        self._settings = settings
        self._db = db
        self._notifier = notifier
        self.leading = False
        # Reaping waits until the database has been reachable for a whole offline period: the
        # heartbeats nodes sent while it was away were lost, not missed.
        self._reachable_since = float("-inf")
        LEADER.set(0)

    def database_failed(self) -> None:
        """Note that a call to the database failed (reaping pauses until it is back)."""
        self._reachable_since = float("inf")

    def database_ok(self) -> None:
        """Note that a call to the database succeeded."""
        if self._reachable_since == float("inf"):
            self._reachable_since = time.monotonic()

    async def check_leadership(self) -> bool:
        """Take or drop the duties as the database says; ``True`` while leading."""
        leading = await self._db.lead()
        if leading != self.leading:
            self.leading = leading
            LEADER.set(1 if leading else 0)
            if not leading:
                await self._notifier.stop_all()
        return leading

    async def pump(self) -> int:
        """Feed queued outbox rows to the notifier (leader only); returns how many were new."""
        if not await self.check_leadership():
            return 0
        fed = 0
        for outbox_id, node_id, body in await self._db.run(outbox.pending):
            before = self._notifier.pending(node_id)
            self._notifier.enqueue(node_id, body, outbox_id)
            fed += self._notifier.pending(node_id) - before
        return fed

    async def reap(self) -> int:
        """Mark silent nodes offline (leader only, and not just after a database outage)."""
        if not await self.check_leadership():
            return 0
        offline_after = self._settings.offline_after_s
        if time.monotonic() - self._reachable_since < offline_after:
            return 0
        changed = await self._db.run(nodes.reap, offline_after)
        if changed:
            logger.info("%d silent node(s) marked offline", changed)
        return changed
