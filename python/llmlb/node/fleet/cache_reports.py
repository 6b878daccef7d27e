"""The node tells every router of its fleet which prefix keys its caches hold.

A :class:`CacheReporter` task wakes when the :class:`CacheDirectory` changes, waits
``BATCH_S`` (so a burst of changes makes one report), and posts a
:class:`llmlb.prefix_keys.CacheReport` to each router listed in ``--router``: every router
keeps its own index, so several routers route alike without a message bus or a database
write. A router that has not heard from this process yet, missed a report (unreachable,
restarted, 409 ``cache_resync``) or is due for a refresh (every ``SNAPSHOT_EVERY_S``) gets a
snapshot instead of the changes. A router that heard nothing for one ``keepalive_s`` (the
heartbeat interval) gets an empty delta: a router restarted meanwhile answers it with 409
``cache_resync``, so it learns what this node holds within a heartbeat, not at the next
change or refresh. Why posts and not a stream per router: reports are small
and bursty (a few keys per answer), a post is answered with the router's verdict (a
resync is asked for by status code), and a router restart needs no reconnect logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from llmlb import config
from llmlb.node.inference.cache_directory import CacheDirectory
from llmlb.node.models.membership import Membership
from llmlb.prefix_keys import MAX_REPORT_KEYS, CacheReport

if TYPE_CHECKING:
    import aiohttp

__all__ = ["CacheReporter"]

logger = logging.getLogger(__name__)

BATCH_S = 0.05  # changes gathered into one report (the routers hear within 100 ms)
RETRY_S = 1.0  # a router that failed is tried again after this
SNAPSHOT_EVERY_S = 60.0
TIMEOUT_S = 5.0


@dataclass
class _Router:
    url: str
    seq: int = 0
    snapshot_due: bool = True
    retry_at: float = 0.0
    refreshed: float = 0.0
    sent: float = 0.0  # last report accepted


class CacheReporter:
    """Posts cache reports to every router (see the module docstring).

    Args:
        router_url: ``--router`` (one URL or several, comma-separated).
        api_key: the node key the routers know.
        membership: the node's id in the fleet.
        node_secret: binds the id to this node (as in heartbeats).
        directory: what the caches hold.
        keepalive_s: how long a router may hear nothing before it gets an empty delta
            (called each time: the heartbeat interval the router set).
    """

    def __init__(
        self,
        router_url: str,
        api_key: str | None,
        membership: Membership,
        node_secret: str | None,
        directory: CacheDirectory,
        keepalive_s: Callable[[], float] = lambda: 5.0,
    ):
        self.keepalive_s = keepalive_s
        self.routers = [_Router(url) for url in config.router_urls(router_url)]
        self.api_key = api_key
        self.membership = membership
        self.node_secret = node_secret
        self.directory = directory
        self.epoch = secrets.token_hex(8)
        self.reports = 0  # reports accepted, all routers together
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start reporting (returns at once; nothing happens without routers)."""
        if not self.routers:
            return
        loop = asyncio.get_running_loop()
        self.directory.on_change = lambda: loop.call_soon_threadsafe(self._wake.set)
        self._task = loop.create_task(self._run())

    async def close(self) -> None:
        """Stop reporting."""
        self.directory.on_change = lambda: None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
        )
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_due())
            await asyncio.sleep(BATCH_S)
            self._wake.clear()
            stored, removed = self.directory.take_changes()
            now = time.monotonic()
            for router in self.routers:
                if now - router.refreshed > SNAPSHOT_EVERY_S:
                    router.snapshot_due = True
                if router.snapshot_due and now < router.retry_at:
                    continue
                quiet = now - router.sent >= self.keepalive_s()
                if not router.snapshot_due and not stored and not removed and not quiet:
                    continue
                await self._send(router, stored, removed)

    def _next_due(self) -> float:
        now = time.monotonic()
        due = [r.retry_at - now for r in self.routers if r.snapshot_due]
        due += [r.refreshed + SNAPSHOT_EVERY_S - now for r in self.routers]
        keepalive = self.keepalive_s()  # (a router owed a snapshot waits for its retry_at)
        due += [r.sent + keepalive - now for r in self.routers if not r.snapshot_due]
        return max(0.05, min(due, default=SNAPSHOT_EVERY_S))

    async def _send(
        self, router: _Router, stored: dict[str, list[int]], removed: dict[str, list[int]]
    ) -> None:
        snapshot = router.snapshot_due
        if snapshot:
            stored, removed = self.directory.snapshot(MAX_REPORT_KEYS), {}
        router.seq += 1
        report = CacheReport(self.epoch, router.seq, snapshot, stored, removed, self.node_secret)
        url = f"{router.url}/v0/nodes/{self.membership.node_id}/cache"
        assert self._session is not None
        try:
            async with self._session.post(url, data=orjson.dumps(report.to_json())) as resp:
                status = resp.status
                answer = await resp.read()
        except (OSError, TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure: resync
            logger.debug("cache report to %s failed: %s", router.url, exc)
            status, answer = 0, b""
        if status in (200, 202, 204):
            self.reports += 1
            router.sent = time.monotonic()
            router.snapshot_due = False
            if snapshot:
                router.refreshed = time.monotonic()
            return
        # lost (unreachable, restarted, not registered yet, asked to resync): start again, at
        # once when the router asked for a snapshot, else after a pause
        router.snapshot_due = True
        resync = status == 409 and b'"cache_resync"' in answer
        router.retry_at = time.monotonic() + (0 if resync else RETRY_S)
