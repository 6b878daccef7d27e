"""The router's database: one data-access layer over SQLite (default) and PostgreSQL.

Query functions (in ``keys``, ``nodes``, ``registry``, ``outbox``) take a connection and
run synchronously with ``?`` placeholders; :class:`Database` runs them off the event loop.
The SQLite file (``lb.db``) gets one connection on one thread (:mod:`.sqlite`); a
PostgreSQL URL gets a pool and a listener connection (:mod:`.postgres`, imported only
then). Both share the schema and the same versioned migrations (:mod:`.schema`) and the
connection helpers (:mod:`.base`), re-exported here.

Writers bump a row of ``state_version`` (``keys`` or ``fleet``) in the same transaction as a
change the in-memory caches must see. SQLite workers notice through ``PRAGMA data_version``;
PostgreSQL routers through ``NOTIFY`` (sent by :func:`bump`, delivered at commit).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmlb.router.db.base import (
    CHANGE_CHANNEL,
    FLEET,
    INTEGRITY_ERRORS,
    KEYS,
    OUTBOX,
    POSTGRESQL,
    SQLITE,
    Conn,
    DatabaseUnavailable,
    IntegrityError,
    bump,
    data_version,
    dialect_of,
    is_postgres_url,
    iso_from_unix,
    now_iso,
    signal,
    transaction,
    unix_now,
    versions,
)
from llmlb.router.db.schema import MIGRATIONS, check_version, statement_for

__all__ = [
    "Backend",
    "CHANGE_CHANNEL",
    "Conn",
    "Database",
    "DatabaseUnavailable",
    "FLEET",
    "INTEGRITY_ERRORS",
    "IntegrityError",
    "KEYS",
    "MIGRATIONS",
    "OUTBOX",
    "POSTGRESQL",
    "SQLITE",
    "bump",
    "check_version",
    "connect",
    "data_version",
    "dialect_of",
    "is_postgres_url",
    "iso_from_unix",
    "migrate",
    "now_iso",
    "open_database",
    "schema_version",
    "signal",
    "statement_for",
    "transaction",
    "unix_now",
    "versions",
]

T = TypeVar("T")


def connect(path: Path) -> sqlite3.Connection:
    """Open the SQLite file ``path`` in autocommit mode with WAL, foreign keys and a busy
    timeout."""
    from llmlb.router.db.sqlite import connect as connect_sqlite

    return connect_sqlite(path)


def schema_version(conn: Conn) -> int:
    """The schema version recorded in the database."""
    if isinstance(conn, sqlite3.Connection):
        from llmlb.router.db.sqlite import schema_version as sqlite_version

        return sqlite_version(conn)
    from llmlb.router.db.postgres import schema_version as pg_version

    return pg_version(conn)  # type: ignore[arg-type]  # not SQLite: a PgConn


def migrate(conn: Conn) -> int:
    """Apply pending migrations, each in its own transaction; returns the new version.

    On PostgreSQL this holds an advisory lock throughout, so routers starting together
    migrate once.

    Raises:
        RuntimeError: the database was written by a newer llmlb.
    """
    if not isinstance(conn, sqlite3.Connection):
        from llmlb.router.db.postgres import migrate as pg_migrate

        return pg_migrate(conn)  # type: ignore[arg-type]  # not SQLite: a PgConn
    from llmlb.router.db.sqlite import migrate as sqlite_migrate

    return sqlite_migrate(conn)


def open_database(target: str | Path) -> Any:
    """Connect and migrate; the one call the CLI makes at start.

    Args:
        target: the SQLite file, or a ``postgresql://`` URL.

    Returns:
        A ``sqlite3.Connection``, or a :class:`~llmlb.router.db.postgres.PgConn`; both
        have ``close()``.
    """
    conn: Any
    if is_postgres_url(target):
        from llmlb.router.db.postgres import open_connection

        conn = open_connection(str(target))
    else:
        conn = connect(Path(target))
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class Backend(Protocol):
    """One worker's access to one database (:mod:`.db_sqlite`, :mod:`.db_postgres`)."""

    dialect: str
    shared: bool  # several routers may use it at once

    async def open(self) -> None: ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def wait_for_change(self, timeout: float) -> bool: ...

    async def lead(self) -> bool: ...

    async def close(self) -> None: ...


class Database:
    """A worker's database: the backend ``target`` names.

    Args:
        target: the SQLite file (``Path`` or plain string), or a ``postgresql://`` URL.
        poll_interval_s: how often SQLite is polled for other workers' commits.
    """

    def __init__(self, target: str | Path, poll_interval_s: float = 0.25):
        self.target = target
        self.backend: Backend
        if is_postgres_url(target):
            from llmlb.router.db.postgres import PostgresBackend

            self.backend = PostgresBackend(str(target))
        else:
            from llmlb.router.db.sqlite import SqliteBackend

            self.backend = SqliteBackend(Path(target), poll_interval_s)
        self.path = None if is_postgres_url(target) else Path(target)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.backend.dialect

    @property
    def shared(self) -> bool:
        """Whether other routers may share this database (PostgreSQL)."""
        return self.backend.shared

    async def open(self) -> None:
        """Connect and migrate."""
        await self.backend.open()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` off the event loop and return its result.

        Raises:
            DatabaseUnavailable: the database cannot be reached.
        """
        return await self.backend.run(fn, *args)

    async def wait_for_change(self, timeout: float) -> bool:
        """Return when another connection may have changed something (``True``), or after
        ``timeout`` seconds (``False``)."""
        return await self.backend.wait_for_change(timeout)

    async def lead(self) -> bool:
        """Whether this worker holds the fleet's background duties (taken when free)."""
        return await self.backend.lead()

    async def data_version(self) -> int:
        """SQLite only: ``PRAGMA data_version`` of the watch connection."""
        return await self.backend.data_version()  # type: ignore[attr-defined]

    async def close(self) -> None:
        """Close every connection."""
        await self.backend.close()
