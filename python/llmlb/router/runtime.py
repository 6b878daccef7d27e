"""One worker's live state: database, key cache, fleet view, sync notifier, background tasks.

Every worker process keeps its own caches, and requests never read the database for auth
or routing. A background task waits for the database to report a change (SQLite: ``PRAGMA
data_version`` polled every ``change_poll_interval_s``; PostgreSQL: ``LISTEN``, delivered
at the writer's commit) and reloads what the ``state_version`` counters say moved, so a key
revoked or a node registered through any worker of any router reaches the others within a
second. Every ``full_refresh_s`` everything is reloaded regardless (the safety net for a
lost notification, and how the active-request counts of heartbeats reach the balancer).

When the database is unreachable the caches stay as they are: inference goes on, calls
that need the database answer 503 ``database_unavailable``, and the next successful
refresh picks everything up again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from prometheus_client import Gauge

from llmlb.router import db
from llmlb.router.control import keys, nodes, outbox, quota, registry, usage
from llmlb.router.control.fleet import FleetView
from llmlb.router.control.keys import KeyCache
from llmlb.router.control.leader import Duties
from llmlb.router.control.limits import KeyLimits
from llmlb.router.control.settings import RouterSettings
from llmlb.router.control.sync import SyncNotifier, sync_body
from llmlb.router.proxy import index_bus
from llmlb.router.proxy.admission import (
    BUDGET_IDLE_S,
    PARALLEL_IDLE_S,
    Admission,
    LimitExceeded,
)
from llmlb.router.proxy.prefix_index import PrefixIndex

logger = logging.getLogger("llmlb.router")
T = TypeVar("T")

NODES = Gauge(
    "llmlb_router_nodes", "Registered nodes by status.", ["status"], multiprocess_mode="livemax"
)
MODELS = Gauge("llmlb_router_models_registered", "Registered models.", multiprocess_mode="livemax")
USAGE_FLUSH_S = 1.0  # a SIGKILL loses at most this much usage
USAGE_COMPACT_S = 3600.0
LEASE_BACKOFF_S = 1.0  # after a failed lease, refuse beyond what is held this long at once
# After the fleet refused a key parallel slots, refuse its requests here without asking the
# database again this long (the refusal marked the key wanted for 3 s): at most a few
# database writes a second per key and router however fast refused clients retry.
SLOTS_REFUSED_S = 0.25


def _snapshot(conn: db.Conn, known: dict[str, int]) -> tuple[dict[str, int], Any, Any]:
    """Versions, plus the key map and/or fleet data whose version moved since ``known``."""
    current = db.versions(conn)
    key_hashes = keys.load_entries(conn) if current.get(db.KEYS) != known.get(db.KEYS) else None
    fleet = None
    if current.get(db.FLEET) != known.get(db.FLEET):
        fleet = (nodes.load_states(conn), registry.load_registered(conn))
    return current, key_hashes, fleet


def _write_usage(
    conn: db.Conn,
    rows: usage.Rows,
    starts: dict[str, float],
    changes: quota.Adjustments,
    budget_changes: quota.BudgetChanges,
    router_id: str,
) -> dict[str, int]:
    """Write ``rows`` and the quota and budget lease changes; return the tokens each budget
    key used since its period start."""
    usage.flush(conn, rows)
    quota.adjust(conn, changes, router_id)
    quota.adjust_budgets(conn, budget_changes, router_id)
    by_start: dict[float, list[str]] = {}
    for key_id, start in starts.items():
        by_start.setdefault(start, []).append(key_id)
    stored: dict[str, int] = {}
    for start, key_ids in by_start.items():
        stored.update(usage.spent(conn, key_ids, start))
    return stored


def _slots_refused(limit: int) -> LimitExceeded:
    """429 ``rate_limit_exceeded``: the fleet holds every parallel slot of the key."""
    return LimitExceeded(
        429,
        "rate_limit_exceeded",
        f"this key has {limit} requests in flight across the fleet, its limit "
        f"(max_parallel {limit}); retry when one ends",
        retry_after=1.0,
    )


class Runtime:
    """State and background work of one router worker.

    Args:
        settings: the router's settings.
    """

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.db = db.Database(settings.database, poll_interval_s=settings.change_poll_interval_s)
        self.keys = KeyCache()
        self.fleet = FleetView(on_offline=self._persist_offline)
        # What each node's prompt cache holds, from its reports (POST /v0/nodes/{id}/cache)
        # and this worker's routing; the inference proxy routes by it.
        self.index = PrefixIndex()
        # With several workers, each passes the reports it applies on to the others.
        self.index_bus = index_bus.from_environment(self.index)
        self.notifier = SyncNotifier(settings, self.db)
        self.duties = Duties(settings, self.db, self.notifier)
        # Limited keys' counters and every key's usage not yet written (the proxy's).
        # Routers sharing PostgreSQL, and the workers of one router, admit rpm, tpm, budgets
        # and max_parallel against leases of the key's quota in the database.
        self.admission = Admission(shared=self.db.shared or settings.workers > 1)
        self.usage = usage.UsageBook()
        self.router_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._lease_locks: dict[str, asyncio.Lock] = {}
        self._lease_failed_at = -LEASE_BACKOFF_S  # loop time of the last failed lease
        # Parallel slots: a lease and the batch's renewal never interleave (each sets what
        # the database records this worker holds).
        self._slots_lock = asyncio.Lock()
        self._slots_refused: dict[str, float] = {}  # key id -> loop time of the last refusal
        self._versions: dict[str, int] = {}
        self._refresh_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._db_down = False

    async def start(self) -> None:
        """Open the database, make sure an admin key exists, load caches, start tasks."""
        await self.db.open()
        await self.db.run(keys.bootstrap_admin_key, self.settings.home, self.settings.admin_key)
        await self.refresh(full=True)
        if self.index_bus is not None and not self.index_bus.start():
            self.index_bus = None
        await self.notifier.start()
        await self.duties.check_leadership()
        await self.flush_usage()
        self._spawn(self._watch(), "llmlb-watch")
        self._spawn(self._reap(), "llmlb-reap")
        self._spawn(self._account(), "llmlb-usage")

    async def close(self) -> None:
        """Stop background work, write the last usage and close the database."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.index_bus is not None:
            self.index_bus.close()
        self.admission.release_budgets()  # what this router holds goes back to the fleet
        try:
            await self.flush_usage()
        except Exception as exc:  # noqa: BLE001 - closing anyway
            logger.warning("cannot write the last usage: %s", exc)
        try:
            await self.renew_slots(idle_s=0.0)  # every free parallel slot goes back
        except Exception as exc:  # noqa: BLE001 - closing anyway; they expire
            logger.warning("cannot give back parallel slots: %s", exc)
        await self.notifier.close()
        await self.db.close()

    async def refresh(self, full: bool = False) -> None:
        """Reload whichever caches the database says changed (``full``: all of them)."""
        async with self._refresh_lock:
            known = {} if full else self._versions
            current, key_hashes, fleet = await self.db.run(_snapshot, known)
            if key_hashes is not None:
                self.keys.load(key_hashes)
                for entry in key_hashes.values():  # budgets are synced from the first flush
                    if entry.limits is not None and entry.limits.budget_period is not None:
                        self.admission.state(entry.id, entry.limits)
            if fleet is not None:
                self.fleet.load(*fleet)
                for status, count in self.fleet.node_counts().items():
                    NODES.labels(status=status).set(count)
                MODELS.set(len(fleet[1]))
            self._versions = current

    async def notify(self, node_ids: Iterable[str], model_ids: list[str], action: str) -> None:
        """Queue a sync notification for each node; the fleet's leader delivers it.

        Raises:
            llmlb.router.db.DatabaseUnavailable: it could not be queued.
        """
        if await self.db.run(outbox.enqueue, list(node_ids), sync_body(model_ids, action)):
            await self.duties.pump()  # at once when this worker leads; else the leader wakes

    def forget_node(self, node_id: str) -> None:
        """Stop notifying a node that unregistered (its outbox rows went with it)."""
        self.notifier.cancel(node_id)

    async def flush_usage(self) -> None:
        """Write the usage counted since the last call, then read back every router's usage
        of the keys with budgets (their spent tokens).

        Raises:
            llmlb.router.db.DatabaseUnavailable: the rows stay in memory for the next try.
        """
        rows = self.usage.drain()
        admission = self.admission
        admission.begin_flush()
        starts = admission.budgets()
        changes = admission.drain_adjustments()
        if not self._db_down:  # else kept: admitted against until the database is back
            admission.release_budgets(BUDGET_IDLE_S)
        budget_changes = admission.drain_budget_adjustments()
        try:
            stored = await self.db.run(
                _write_usage, rows, starts, changes, budget_changes, self.router_id
            )
        except BaseException:
            self.usage.restore(rows)
            admission.restore_adjustments(changes)
            admission.restore_budget_adjustments(budget_changes)
            raise
        self.admission.synced(stored, starts)

    async def lease(
        self, key_id: str, limits: KeyLimits, needs: list[tuple[str, int, int]]
    ) -> float | None:
        """Get this second's slices of ``key_id``'s quota (``needs``: kind, limit, amount)
        from the database, one request per key at a time.

        A budget (kind :data:`quota.BUDGET`) is leased for its period; when the fleet's
        leases have used it up the request is refused at once.

        Returns:
            ``None`` when granted, else the seconds until the fleet's window has room (1 s
            when the database cannot be reached: the router grants nothing it does not hold).

        Raises:
            LimitExceeded: 429 ``insufficient_quota``: the period's budget is leased out.
        """
        loop = asyncio.get_running_loop()
        if loop.time() - self._lease_failed_at < LEASE_BACKOFF_S:
            return LEASE_BACKOFF_S  # the database just failed: no wait on it per request
        lock = self._lease_locks.get(key_id)
        if lock is None:
            lock = self._lease_locks[key_id] = asyncio.Lock()
        async with lock:
            admission = self.admission
            for kind, limit, need in needs:
                if not admission.lacking(key_id, kind, need):
                    continue  # another request refilled it meanwhile
                if kind == quota.BUDGET:
                    if not await self._lease_budget(key_id, limit, need):
                        return LEASE_BACKOFF_S
                    continue
                if kind == quota.PARALLEL:
                    if not await self._lease_slots(key_id, limit):
                        return LEASE_BACKOFF_S
                    continue
                second = int(admission.clock())
                leased = await self._lease_call(
                    "quota", quota.lease, key_id, kind, limit, need, second, self.router_id
                )
                if leased is None:
                    return LEASE_BACKOFF_S
                granted, used, wait = leased
                if not granted:
                    return wait
                admission.granted(key_id, kind, second, granted, used)
        return None

    async def _lease_call(self, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(conn, *args)`` on the database; ``None`` when it failed (logged, and leases
        back off for ``LEASE_BACKOFF_S``: requests are refused beyond what is held)."""
        try:
            return await self.db.run(fn, *args)
        except Exception as exc:  # noqa: BLE001 - refuse beyond what is held
            self._lease_failed_at = asyncio.get_running_loop().time()
            self._database_failed(f"cannot lease {what}", exc)
            return None

    async def _lease_slots(self, key_id: str, limit: int) -> bool:
        """Lease parallel slots of ``key_id`` (``limit``: its max_parallel) so that this
        worker holds one more than it has requests in flight; ``False`` when the database
        failed.

        Raises:
            LimitExceeded: 429 ``rate_limit_exceeded`` (``Retry-After`` 1 s): the other
                routers hold every slot (they give idle ones back within about a second).
        """
        admission = self.admission
        loop = asyncio.get_running_loop()
        async with self._slots_lock:
            held = admission.slots_held(key_id)
            inflight = admission.states[key_id].inflight
            need = inflight + 1 - held
            if need <= 0:
                return True  # a renewal or another request settled meanwhile
            if loop.time() - self._slots_refused.get(key_id, -SLOTS_REFUSED_S) < SLOTS_REFUSED_S:
                raise _slots_refused(limit)
            now = admission.clock()
            granted = await self._lease_call(
                "parallel slots",
                quota.lease_parallel, key_id, limit, need, held, now, self.router_id,
            )  # fmt: skip
            if granted is None:
                return False
            if not granted:
                self._slots_refused[key_id] = loop.time()
                raise _slots_refused(limit)
            self._slots_refused.pop(key_id, None)
            admission.slots_granted(key_id, held + granted, now)
        return True

    async def renew_slots(self, idle_s: float = PARALLEL_IDLE_S) -> None:
        """The batch of parallel slots: give back the idle ones, renew the rest (one
        statement), then give back at once the free slots of keys another router wants.

        Raises:
            llmlb.router.db.DatabaseUnavailable: nothing renewed (the slots lapse here
                TTL - margin after the last renewal).
        """
        admission = self.admission
        async with self._slots_lock:
            held = admission.slots_to_renew(idle_s)
            if held is None:
                return
            now = admission.clock()
            alive, wanted = await self.db.run(quota.renew_parallel, held, now, self.router_id)
            admission.slots_renewed(alive, now)
            given = admission.give_back_wanted(wanted)
            if given:
                await self.db.run(quota.give_back_parallel, given, self.router_id)

    async def _lease_budget(self, key_id: str, budget: int, total: int) -> bool:
        """Lease a slice of ``key_id``'s budget for its current period, so that this router
        holds at least ``total``; ``False`` when the database failed.

        Raises:
            LimitExceeded: 429 ``insufficient_quota``: the fleet leased the whole budget.
        """
        admission = self.admission
        period, since, end, held = admission.budget_lease(key_id)
        need = max(1, total - held)
        leased = await self._lease_call(
            "budget", quota.lease_budget, key_id, period, since, budget, need, held, self.router_id
        )
        if leased is None:
            return False
        granted, _ = leased
        if not granted:
            state = admission.states[key_id]
            raise LimitExceeded(
                429,
                "insufficient_quota",
                f"this key's budget of {budget} tokens per {state.limits.budget_period} is "
                "used up across the fleet; it resets at the next period (UTC)",
                retry_after=max(1.0, end - admission.clock()),
            )
        admission.budget_granted(key_id, period, granted)
        return True

    async def _account(self) -> None:
        loop = asyncio.get_running_loop()
        next_compact = loop.time()
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)
            try:
                await self.renew_slots(PARALLEL_IDLE_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the slots lapse; the next tick retries
                self._database_failed("cannot renew parallel slots", exc)
            try:
                await self.flush_usage()
                if loop.time() >= next_compact and await self.db.lead():
                    next_compact = loop.time() + USAGE_COMPACT_S
                    retention = self.settings.usage_retention_days
                    await self.db.run(usage.compact, db.unix_now(), retention)
                    await self.db.run(quota.drop_lapsed_budgets, db.unix_now())
                    await self.db.run(quota.drop_expired_parallel, db.unix_now())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - kept in memory; the next tick retries
                self._database_failed("cannot write usage", exc)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _database_failed(self, what: str, exc: Exception) -> None:
        self.duties.database_failed()
        if not self._db_down:
            self._db_down = True
            logger.warning("%s: %s; serving from the caches until it is back", what, exc)

    def _database_ok(self) -> None:
        self.duties.database_ok()
        if self._db_down:
            self._db_down = False
            logger.info("the database is reachable again")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        full_every = self.settings.full_refresh_s
        next_full = loop.time() + full_every
        while True:
            try:
                changed = await self.db.wait_for_change(max(0.0, next_full - loop.time()))
                full = loop.time() >= next_full
                if full:
                    next_full = loop.time() + full_every
                await self.refresh(full=full or self._db_down)
                if changed or full:
                    await self.duties.pump()
                self._database_ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching; the caches stay
                self._database_failed("cannot read the database", exc)
                await asyncio.sleep(min(1.0, full_every))

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
                await self.duties.pump()  # rows whose wake-up was missed
                if await self.duties.reap():
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                self._database_failed("cannot run the fleet's background duties", exc)

    def _persist_offline(self, node_id: str) -> None:
        logger.warning("node %s marked offline by the proxy", node_id)

        async def persist() -> None:
            try:
                await self.db.run(nodes.mark_offline, node_id)
            except Exception as exc:  # noqa: BLE001 - this router's cache has it already
                logger.info("cannot persist node %s offline: %s", node_id, exc)

        self._spawn(persist(), f"llmlb-offline-{node_id}")
