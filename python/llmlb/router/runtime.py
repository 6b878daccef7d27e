"""One worker's live state: database, key cache, fleet view, sync notifier, background tasks.

Every worker process keeps its own caches. A background task polls ``PRAGMA data_version``
(cheap, no table read) and reloads what the ``state_version`` counters say changed, so a key
revoked or a node registered through one worker reaches the others within
``change_poll_interval_s``. Requests never read the database for auth or routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import Any

from prometheus_client import Gauge

from llmlb.router import db, keys, nodes, registry
from llmlb.router.fleet import FleetView
from llmlb.router.keys import KeyCache
from llmlb.router.settings import RouterSettings
from llmlb.router.sync import SyncNotifier

logger = logging.getLogger("llmlb.router")

NODES = Gauge(
    "llmlb_router_nodes", "Registered nodes by status.", ["status"], multiprocess_mode="livemax"
)
MODELS = Gauge("llmlb_router_models_registered", "Registered models.", multiprocess_mode="livemax")


def _snapshot(conn: sqlite3.Connection, known: dict[str, int]) -> tuple[dict[str, int], Any, Any]:
    """Versions, plus the key map and/or fleet data whose version moved since ``known``."""
    current = db.versions(conn)
    key_hashes = keys.load_hashes(conn) if current.get(db.KEYS) != known.get(db.KEYS) else None
    fleet = None
    if current.get(db.FLEET) != known.get(db.FLEET):
        fleet = (nodes.load_states(conn), registry.load_registered(conn))
    return current, key_hashes, fleet


class Runtime:
    """State and background work of one router worker.

    Args:
        settings: the router's settings.
    """

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.db = db.Database(settings.db_path)
        self.keys = KeyCache()
        self.fleet = FleetView(on_offline=self._persist_offline)
        self.notifier = SyncNotifier(settings, self.db)
        self._versions: dict[str, int] = {}
        self._refresh_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Open the database, make sure an admin key exists, load caches, start tasks."""
        await self.db.open()
        await self.db.run(keys.bootstrap_admin_key, self.settings.home, self.settings.admin_key)
        await self.refresh()
        await self.notifier.start()
        self._spawn(self._watch(), "llmlb-watch")
        self._spawn(self._reap(), "llmlb-reap")

    async def close(self) -> None:
        """Stop background work and close the database."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.notifier.close()
        await self.db.close()

    async def refresh(self) -> None:
        """Reload whichever caches the database says changed."""
        async with self._refresh_lock:
            current, key_hashes, fleet = await self.db.run(_snapshot, self._versions)
            if key_hashes is not None:
                self.keys.replace(key_hashes)
            if fleet is not None:
                self.fleet.load(*fleet)
                for status, count in self.fleet.node_counts().items():
                    NODES.labels(status=status).set(count)
                MODELS.set(len(fleet[1]))
            self._versions = current

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch(self) -> None:
        last = await self.db.data_version()
        while True:
            await asyncio.sleep(self.settings.change_poll_interval_s)
            try:
                current = await self.db.data_version()
                if current != last:
                    last = current
                    await self.refresh()
            except sqlite3.Error:
                logger.exception("cannot poll the database for changes")

    async def _reap(self) -> None:
        interval = max(0.05, self.settings.heartbeat_interval_s / 2)
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            if loop.time() - before > interval * 1.5:
                # This worker was too busy to run on time, so heartbeats may be waiting
                # unread: a busy router must never take a node offline.
                continue
            try:
                if await self.db.run(nodes.reap, self.settings.offline_after_s):
                    await self.refresh()
            except sqlite3.Error:
                logger.exception("cannot mark silent nodes offline")

    def _persist_offline(self, node_id: str) -> None:
        logger.warning("node %s marked offline by the proxy", node_id)

        async def persist() -> None:
            with contextlib.suppress(sqlite3.Error):
                await self.db.run(nodes.mark_offline, node_id)

        self._spawn(persist(), f"llmlb-offline-{node_id}")
