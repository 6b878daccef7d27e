"""Sync notifications: tell nodes a model was registered or deleted, retrying with backoff.

Each node has its own FIFO of pending notifications and at most one task draining it.
A failed POST is retried after ``base``, ``2*base``, ``4*base`` … capped at ``max`` seconds,
for as long as the node stays registered; the admin request that caused it never waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable

import aiohttp
import orjson
from prometheus_client import Counter

from llmlb.router import nodes
from llmlb.router.db import Database
from llmlb.router.settings import RouterSettings

logger = logging.getLogger("llmlb.router.sync")

SYNC_PATH = "/api/models/sync"

NOTIFICATIONS = Counter(
    "llmlb_router_sync_notifications_total",
    "Sync notification attempts sent to nodes, by result.",
    ["result"],
)


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
        self._queues: dict[str, deque[bytes]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Create the HTTP client."""
        timeout = aiohttp.ClientTimeout(total=self._settings.sync_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)

    def notify(self, node_ids: Iterable[str], model_ids: list[str], action: str) -> None:
        """Queue ``{"models": model_ids, "action": action}`` for each node."""
        body = orjson.dumps({"models": model_ids, "action": action})
        for node_id in node_ids:
            self._queues.setdefault(node_id, deque()).append(body)
            task = self._tasks.get(node_id)
            if task is None or task.done():
                self._tasks[node_id] = asyncio.create_task(
                    self._drain(node_id), name=f"llmlb-sync-{node_id}"
                )

    def cancel(self, node_id: str) -> None:
        """Drop a node's pending notifications (it unregistered)."""
        self._queues.pop(node_id, None)
        task = self._tasks.pop(node_id, None)
        if task is not None:
            task.cancel()

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
            target = await self._db.run(nodes.sync_target, node_id)
            if target is None:  # unregistered: stop retrying
                break
            url, token = target
            if await self._post(url + SYNC_PATH, token, queue[0]):
                queue.popleft()
                attempt = 0
                continue
            delay = backoff_delay(
                attempt, self._settings.sync_backoff_base_s, self._settings.sync_backoff_max_s
            )
            attempt += 1
            logger.info("sync notification to node %s failed; retrying in %.1fs", node_id, delay)
            await asyncio.sleep(delay)
        self._queues.pop(node_id, None)
        self._tasks.pop(node_id, None)

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
