"""The router's SQLite database: connection setup, versioned migrations, transactions.

Each worker process owns one connection, used from one dedicated thread
(:class:`Database`), so the event loop never blocks on SQLite. Writers bump a row of
``state_version`` (``keys`` or ``fleet``) in the same transaction as a change the
in-memory caches must see; workers notice through ``PRAGMA data_version``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

KEYS = "keys"
FLEET = "fleet"

# Migration N (1-based) brings the schema from user_version N-1 to N. Append only.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT,
            scope TEXT NOT NULL CHECK (scope IN ('api', 'node', 'admin')),
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE models (
            id TEXT PRIMARY KEY,
            repo TEXT NOT NULL,
            revision TEXT NOT NULL,
            format TEXT NOT NULL,
            filename TEXT NOT NULL,
            quantization TEXT,
            chat_template TEXT,
            size_bytes INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            created_ts INTEGER NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE model_files (
            model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            filename TEXT NOT NULL,
            format TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT,
            url TEXT NOT NULL,
            priority INTEGER NOT NULL,
            optional INTEGER NOT NULL,
            backends TEXT NOT NULL,
            PRIMARY KEY (model_id, filename)
        )""",
        """CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            runtimes TEXT NOT NULL,
            gpu TEXT NOT NULL,
            slots INTEGER NOT NULL,
            sync_token TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('online', 'offline')),
            models TEXT NOT NULL,
            active_requests INTEGER NOT NULL DEFAULT 0,
            registered_at TEXT NOT NULL,
            last_seen REAL NOT NULL
        )""",
        "CREATE TABLE state_version (name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
        "INSERT INTO state_version (name, version) VALUES ('keys', 0), ('fleet', 0)",
    ],
    # 2: a node id is bound to the sha256 of the credential that registered it (NULL: a row
    # from before, bound by its next registration).
    ["ALTER TABLE nodes ADD COLUMN credential_hash TEXT"],
]


def now_iso() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. ``2025-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, foreign keys and a busy timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; rolls back if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the file (``PRAGMA user_version``)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations, each in its own transaction; returns the new version.

    Raises:
        RuntimeError: the file was written by a newer llmlb.
    """
    while True:
        with transaction(conn):
            current = schema_version(conn)
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"database schema version {current} is newer than this llmlb "
                    f"({len(MIGRATIONS)})"
                )
            if current == len(MIGRATIONS):
                return current
            for statement in MIGRATIONS[current]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {current + 1}")


def bump(conn: sqlite3.Connection, name: str) -> None:
    """Record that the ``name`` state (``keys`` or ``fleet``) changed; call inside a transaction."""
    conn.execute("UPDATE state_version SET version = version + 1 WHERE name = ?", (name,))


def versions(conn: sqlite3.Connection) -> dict[str, int]:
    """The current ``state_version`` counters."""
    return {row[0]: row[1] for row in conn.execute("SELECT name, version FROM state_version")}


def data_version(conn: sqlite3.Connection) -> int:
    """``PRAGMA data_version``: changes whenever another connection commits."""
    return conn.execute("PRAGMA data_version").fetchone()[0]


def open_database(path: Path) -> sqlite3.Connection:
    """Connect and migrate; the one call the CLI and each worker make at start."""
    conn = connect(path)
    migrate(conn)
    return conn


class Database:
    """A worker's connection, used only from its own thread.

    Args:
        path: the SQLite file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmlb-db")
        self._conn: sqlite3.Connection | None = None
        self._watch: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Connect (twice: one connection writes, one watches) and migrate."""

        def _open() -> None:
            self._conn = open_database(self.path)
            self._watch = connect(self.path)

        await asyncio.get_running_loop().run_in_executor(self._executor, _open)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the database thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._conn, *args))

    async def data_version(self) -> int:
        """``PRAGMA data_version`` of the watch connection: moves on every commit."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: data_version(self._watch))

    async def close(self) -> None:
        """Close both connections and stop the thread."""

        def _close() -> None:
            for conn in (self._conn, self._watch):
                if conn is not None:
                    conn.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)


def unix_now() -> float:
    """Wall-clock seconds (heartbeat bookkeeping)."""
    return time.time()


def iso_from_unix(ts: float) -> str:
    """RFC 3339 UTC form of a unix time."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
