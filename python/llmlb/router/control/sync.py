"""Sync notifications: tell nodes a model was registered or deleted, retrying with backoff.

Each node has its own FIFO of pending notifications and at most one task draining it.
A failed POST is retried after ``base``, ``2*base``, ``4*base`` … capped at ``max`` seconds,
for as long as the node stays registered; the admin request that caused it never waits.

The router queues notifications in the database (:mod:`llmlb.router.control.outbox`); only the
fleet's leader (:mod:`llmlb.router.control.leader`) feeds them to its notifier, which deletes each
row once its node accepted it, so one notification is sent once per fleet, and retries go
on at the next leader if this one dies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable

import aiohttp
import orjson
from prometheus_client import Counter

from llmlb.protocol import SyncNotice
from llmlb.router.control import nodes, outbox
from llmlb.router.control.settings import RouterSettings
from llmlb.router.db import Database

logger = logging.getLogger("llmlb.router.control.sync")

SYNC_PATH = "/api/models/sync"

NOTIFICATIONS = Counter(
    "llmlb_router_sync_notifications_total",
    "Sync notification attempts sent to nodes, by result.",
    ["result"],
)


_AWAY = ("", "")  # sync target while the database cannot be read


def sync_body(model_ids: list[str], action: str) -> bytes:
    """The ``POST /api/models/sync`` body (:class:`llmlb.protocol.SyncNotice`)."""
    return orjson.dumps(SyncNotice(model_ids, action).to_dict())


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (0-based): ``min(cap, base * 2**attempt)``."""
    return min(cap, base * (2 ** min(attempt, 32)))


class SyncNotifier:
    """Background sender of ``POST <node>/api/models/sync``.

    Args:
        settings: backoff base/cap and request timeout.
        db: where each node's current URL and sync token are read before every attempt.
    """

    def __init__(self, settings: RouterSettings, db: Database) -> None:
        self._settings = settings
        self._db = db
        # Per node: (body, outbox row id or None), oldest first.
        self._queues: dict[str, deque[tuple[bytes, int | None]]] = {}
        self._rows: set[int] = set()  # outbox rows queued here and not yet deleted
        self._tasks: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Create the HTTP client."""
        timeout = aiohttp.ClientTimeout(total=self._settings.sync_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)

    def notify(self, node_ids: Iterable[str], model_ids: list[str], action: str) -> None:
        """Queue ``{"models": model_ids, "action": action}`` for each node (in memory only)."""
        body = sync_body(model_ids, action)
        for node_id in node_ids:
            self.enqueue(node_id, body)

    def enqueue(self, node_id: str, body: bytes, outbox_id: int | None = None) -> None:
        """Queue ``body`` for ``node_id``; ``outbox_id`` names its database row (deleted once
        delivered, and never queued twice)."""
        if outbox_id is not None:
            if outbox_id in self._rows:
                return
            self._rows.add(outbox_id)
        self._queues.setdefault(node_id, deque()).append((body, outbox_id))
        task = self._tasks.get(node_id)
        if task is None or task.done():
            self._tasks[node_id] = asyncio.create_task(
                self._drain(node_id), name=f"llmlb-sync-{node_id}"
            )

    def cancel(self, node_id: str) -> None:
        """Drop a node's pending notifications (it unregistered)."""
        for _, outbox_id in self._queues.pop(node_id, ()):
            if outbox_id is not None:
                self._rows.discard(outbox_id)
        task = self._tasks.pop(node_id, None)
        if task is not None:
            task.cancel()

    async def stop_all(self) -> None:
        """Stop every retry loop and forget the queues (this router is no longer the leader;
        the outbox rows stay for the next one)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()
        self._rows.clear()

    def pending(self, node_id: str) -> int:
        """Notifications not yet delivered to ``node_id``."""
        return len(self._queues.get(node_id, ()))

    async def close(self) -> None:
        """Cancel every retry loop and close the HTTP client."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    async def _drain(self, node_id: str) -> None:
        queue = self._queues.get(node_id)
        attempt = 0
        while queue:
            try:
                target = await self._db.run(nodes.sync_target, node_id)
            except Exception as exc:  # noqa: BLE001 - the database is away: try again later
                logger.info("cannot look node %s up for a sync notification: %s", node_id, exc)
                target = _AWAY
            if target is None:  # unregistered: stop retrying
                await self._forget(node_id, queue)
                break
            if target is not _AWAY:
                url, token = target
                body, outbox_id = queue[0]
                if await self._post(url + SYNC_PATH, token, body):
                    queue.popleft()
                    attempt = 0
                    if outbox_id is not None:
                        await self._delivered(outbox_id)
                    continue
            delay = backoff_delay(
                attempt, self._settings.sync_backoff_base_s, self._settings.sync_backoff_max_s
            )
            attempt += 1
            logger.info("sync notification to node %s failed; retrying in %.1fs", node_id, delay)
            await asyncio.sleep(delay)
        if self._queues.get(node_id) is queue:
            self._queues.pop(node_id, None)
            self._tasks.pop(node_id, None)

    async def _delivered(self, outbox_id: int) -> None:
        try:
            await self._db.run(outbox.delete, outbox_id)
        except Exception as exc:  # noqa: BLE001 - at worst a later leader sends it again
            logger.warning("cannot delete delivered sync notification %d: %s", outbox_id, exc)
            return
        self._rows.discard(outbox_id)

    async def _forget(self, node_id: str, queue: deque[tuple[bytes, int | None]]) -> None:
        if any(outbox_id is not None for _, outbox_id in queue):
            try:
                await self._db.run(outbox.drop_node, node_id)
            except Exception as exc:  # noqa: BLE001 - dropped with the node's row anyway
                logger.warning("cannot drop sync notifications of node %s: %s", node_id, exc)
        for _, outbox_id in queue:
            if outbox_id is not None:
                self._rows.discard(outbox_id)
        queue.clear()

    async def _post(self, url: str, token: str, body: bytes) -> bool:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = 200 <= response.status < 300
                if not ok:
                    logger.warning(
                        "node at %s answered %d to a sync notification", url, response.status
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("cannot notify node at %s: %s", url, type(exc).__name__)
            ok = False
        NOTIFICATIONS.labels(result="ok" if ok else "failed").inc()
        return ok
