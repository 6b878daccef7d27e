"""What every user of a router database connection shares: the change-signal names, the
:class:`Conn` protocol, the errors, write transactions, ``state_version`` bumps and times.

Apart from the facade (:mod:`llmlb.router.db`) so the backends (:mod:`.sqlite`,
:mod:`.postgres`) can use it without importing the package that imports them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from llmlb.errors import ApiError

KEYS = "keys"
FLEET = "fleet"
OUTBOX = "outbox"  # a change signal only (no counter): sync notifications were queued
CHANGE_CHANNEL = "llmlb_changes"  # PostgreSQL NOTIFY channel

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


class Conn(Protocol):
    """What query functions use of a connection: ``sqlite3.Connection`` or
    :class:`llmlb.router.db.postgres.PgConn` (rows index by position and by column name)."""

    def execute(self, sql: str, params: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Any, /) -> Any: ...


class DatabaseUnavailable(ApiError):
    """503 ``database_unavailable``: the database cannot be reached (the router keeps serving
    inference from its caches; writes wait until it is back)."""

    def __init__(self, detail: str = "") -> None:
        message = "the router's database is unavailable; retry shortly"
        super().__init__(
            503,
            "database_unavailable",
            f"{message} ({detail})" if detail else message,
            retry_after=2,
        )


class IntegrityError(Exception):
    """A constraint failed on PostgreSQL (SQLite raises ``sqlite3.IntegrityError``)."""


INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError, IntegrityError)


def is_postgres_url(target: str | Path) -> bool:
    """Whether ``target`` is a PostgreSQL URL rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def dialect_of(conn: Conn) -> str:
    """``sqlite`` or ``postgresql``."""
    return SQLITE if isinstance(conn, sqlite3.Connection) else POSTGRESQL


def now_iso() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@contextmanager
def transaction(conn: Conn) -> Iterator[Conn]:
    """One write transaction; rolls back if the block raises.

    SQLite: ``BEGIN IMMEDIATE`` (one writer at a time). PostgreSQL: ``BEGIN`` and a
    transaction-scoped advisory lock, so writers are serialised the same way on both and
    the check-then-write functions stay correct across routers.
    """
    if isinstance(conn, sqlite3.Connection):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    else:
        with conn.write_transaction():  # type: ignore[attr-defined]
            yield conn


def bump(conn: Conn, name: str) -> None:
    """Record that the ``name`` state (``keys`` or ``fleet``) changed; call inside a transaction."""
    conn.execute("UPDATE state_version SET version = version + 1 WHERE name = ?", (name,))
    signal(conn, name)


def signal(conn: Conn, name: str) -> None:
    """Tell the other routers ``name`` changed (PostgreSQL ``NOTIFY``, sent at commit).

    SQLite needs nothing: every commit moves ``PRAGMA data_version``.
    """
    if not isinstance(conn, sqlite3.Connection):
        conn.execute("SELECT pg_notify(?, ?)", (CHANGE_CHANNEL, name))


def versions(conn: Conn) -> dict[str, int]:
    """The current ``state_version`` counters."""
    return {row[0]: row[1] for row in conn.execute("SELECT name, version FROM state_version")}


def data_version(conn: sqlite3.Connection) -> int:
    """SQLite's ``PRAGMA data_version``: changes whenever another connection commits."""
    return conn.execute("PRAGMA data_version").fetchone()[0]


def unix_now() -> float:
    """Wall-clock seconds (heartbeat bookkeeping)."""
    return time.time()


def iso_from_unix(ts: float) -> str:
    """RFC 3339 UTC form of a unix time."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
