"""PostgreSQL backend of :mod:`llmlb.router.db`: several routers sharing one database.

psycopg 3 (sync) with ``psycopg_pool``: the query functions are the same synchronous code
SQLite runs, executed on a small thread pool, one pooled connection per call; ``?``
placeholders become ``%s`` and rows index by position and by column name, as
``sqlite3.Row`` does. A dedicated listener connection per worker ``LISTEN``\\ s for change
notifications (sent by :func:`llmlb.router.db.bump` at commit) and holds the session-level
advisory lock that makes its router the fleet's leader; the lock goes when that connection
does, so a dead router's duties move on within one poll.

Locks (advisory, scoped to the database): :data:`MIGRATE_LOCK` while migrating,
:data:`WRITE_LOCK` per write transaction (writers serialised as SQLite's ``BEGIN
IMMEDIATE`` does), :data:`LEADER_LOCK` held by the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from llmlb.router.db.base import (
    CHANGE_CHANNEL,
    POSTGRESQL,
    DatabaseUnavailable,
    IntegrityError,
    now_iso,
)
from llmlb.router.db.schema import run_migration

logger = logging.getLogger("llmlb.router.db")

T = TypeVar("T")

MIGRATE_LOCK = 0x6C6C_6D6C_6201  # "llmlb" + 1
WRITE_LOCK = 0x6C6C_6D6C_6202
LEADER_LOCK = 0x6C6C_6D6C_6203

POOL_SIZE = 4
POOL_TIMEOUT_S = 2.0  # a call waits this long for a connection before 503
LISTEN_POLL_S = 0.25  # the listener's longest wait; leadership is retried every other one
CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 3,
    # A router whose database vanished without a FIN notices within seconds.
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
}


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class Row:
    """A result row, indexed by position or column name (like ``sqlite3.Row``)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]):
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        """Column names."""
        return list(self._index)


def row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    """psycopg row factory making :class:`Row` objects."""
    description = cursor.description or ()
    index = {column.name: i for i, column in enumerate(description)}
    return lambda values: Row(values, index)


class PgConn:
    """A psycopg connection as the query functions use it (``execute`` with ``?``)."""

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        """Run one statement; returns its cursor.

        Raises:
            llmlb.router.db.IntegrityError: a constraint failed.
        """
        try:
            return self.raw.execute(_placeholders(sql), params)
        except psycopg.errors.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per parameter tuple."""
        try:
            with self.raw.cursor() as cursor:
                cursor.executemany(_placeholders(sql), params)
        except psycopg.errors.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[PgConn]:
        """``BEGIN`` … ``COMMIT`` holding :data:`WRITE_LOCK`; rolls back if the block raises."""
        with self.raw.transaction():
            self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield self

    def close(self) -> None:
        """Close the connection."""
        self.raw.close()


def open_connection(url: str) -> PgConn:
    """One autocommit connection to ``url`` (the CLI's start-up work)."""
    return PgConn(
        psycopg.connect(
            url, autocommit=True, row_factory=row_factory, **CONNECT_ARGS  # type: ignore[arg-type]
        )
    )


def schema_version(conn: PgConn) -> int:
    """The highest migration recorded in ``llmlb_migrations`` (0 before any)."""
    row = conn.raw.execute("SELECT to_regclass('llmlb_migrations')").fetchone()
    if row is None or row[0] is None:
        return 0
    latest = conn.raw.execute("SELECT COALESCE(MAX(version), 0) FROM llmlb_migrations")
    return latest.fetchone()[0]  # type: ignore[index]  # an aggregate: always one row


def migrate(conn: PgConn) -> int:
    """Apply pending migrations under :data:`MIGRATE_LOCK`, each in its own transaction.

    Every applied migration gets a row in ``llmlb_migrations`` (version, time).

    Raises:
        RuntimeError: the database was written by a newer llmlb.
    """
    raw = conn.raw
    raw.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
    try:
        raw.execute(
            "CREATE TABLE IF NOT EXISTS llmlb_migrations "
            "(version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        while True:
            with raw.transaction():
                current = schema_version(conn)
                if not run_migration(current, POSTGRESQL, raw.execute):
                    return current
                raw.execute(
                    "INSERT INTO llmlb_migrations (version, applied_at) VALUES (%s, %s)",
                    (current + 1, now_iso()),
                )
            logger.info("database migrated to schema version %d", current + 1)
    finally:
        with contextlib.suppress(psycopg.Error):
            raw.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(detail[:200])


class PostgresBackend:
    """A worker's connections to the PostgreSQL database at ``url``.

    Args:
        url: ``postgresql://USER@HOST:PORT/DB`` (libpq URL).
        pool_size: pooled connections (and threads) for queries.
    """

    dialect = "postgresql"
    shared = True

    def __init__(self, url: str, pool_size: int = POOL_SIZE):
        self.url = url
        self._pool: ConnectionPool | None = None
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="llmlb-pg")
        self._pool_size = pool_size
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._leader = False

    async def open(self) -> None:
        """Migrate, open the pool and start the listener.

        Raises:
            psycopg.OperationalError: the database cannot be reached.
        """
        self._loop = asyncio.get_running_loop()

        def _open() -> None:
            conn = open_connection(self.url)
            try:
                migrate(conn)
            finally:
                conn.close()
            pool = ConnectionPool(
                self.url,
                min_size=1,
                max_size=self._pool_size,
                open=False,
                kwargs={"autocommit": True, "row_factory": row_factory, **CONNECT_ARGS},
                check=ConnectionPool.check_connection,
                timeout=POOL_TIMEOUT_S,
                reconnect_timeout=5.0,
                name="llmlb-router",
            )
            pool.open(wait=True, timeout=10.0)
            self._pool = pool

        await self._loop.run_in_executor(self._executor, _open)
        self._listener = threading.Thread(target=self._listen, name="llmlb-pg-listen", daemon=True)
        self._listener.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on a pooled connection (in a thread).

        Raises:
            llmlb.router.db.DatabaseUnavailable: no connection, or it broke.
        """
        pool = self._pool
        assert pool is not None

        def call() -> T:
            try:
                with pool.connection() as raw:
                    return fn(PgConn(raw), *args)
            except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise _unavailable(exc) from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait for a ``NOTIFY`` on the change channel (or the listener reconnecting)."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            changed = True
        except TimeoutError:
            changed = False
        self._changed.clear()
        return changed

    async def lead(self) -> bool:
        """Whether this worker's listener holds :data:`LEADER_LOCK` (taken when free)."""
        return self._leader

    async def close(self) -> None:
        """Stop the listener (releasing the leadership), close the pool and the threads."""
        self._stop.set()
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 5.0)
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close, 5.0)
        self._executor.shutdown(wait=False)

    # -- the listener thread --------------------------------------------------------------

    def _signal(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._changed.set)

    def _listen(self) -> None:
        conn: psycopg.Connection | None = None
        delay = 0.1
        polls = 0
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True, **CONNECT_ARGS)
                    conn.execute(f"LISTEN {CHANGE_CHANNEL}")
                    delay = 0.1
                    self._signal()  # anything may have changed while disconnected
                if not self._leader and polls % 2 == 0:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
                    if row and row[0]:
                        self._leader = True
                        logger.info("this router now runs the fleet's background duties")
                        self._signal()
                polls += 1
                for _ in conn.notifies(timeout=LISTEN_POLL_S):
                    self._signal()
            except psycopg.Error as exc:
                if conn is not None:
                    logger.warning("database listener lost its connection: %s", exc)
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                if self._leader:
                    logger.warning("no longer running the fleet's background duties")
                self._leader = False
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._leader = False
