"""SQLite backend of :mod:`llmlb.router.db`: the embedded ``lb.db`` of a single router.

Each worker process owns one connection, used from one dedicated thread, so the event loop
never blocks on SQLite; a second connection watches ``PRAGMA data_version`` for the other
workers' commits. The fleet's background duties go to whichever worker holds an exclusive
``flock`` on ``lb.db.leader`` (released by the kernel when that process dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from llmlb.router.db.base import SQLITE, transaction
from llmlb.router.db.schema import run_migration

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: every worker leads
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, foreign keys and a busy timeout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the file (``PRAGMA user_version``)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations, each in its own transaction; returns the new version.

    Raises:
        RuntimeError: the database was written by a newer llmlb.
    """
    while True:
        with transaction(conn):
            current = schema_version(conn)
            if not run_migration(current, SQLITE, conn.execute):
                return current
            conn.execute(f"PRAGMA user_version = {current + 1}")


class FileLeadership:
    """An exclusive, non-blocking ``flock`` on ``path``: held by one process at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; ``True`` while this process holds it."""
        if self._fd is not None or fcntl is None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SqliteBackend:
    """A worker's connections to the SQLite file ``path``.

    Args:
        path: the SQLite file.
        poll_interval_s: how often ``PRAGMA data_version`` is polled.
    """

    dialect = "sqlite"
    shared = False

    def __init__(self, path: Path, poll_interval_s: float = 0.25):
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmlb-db")
        self._conn: sqlite3.Connection | None = None
        self._watch: sqlite3.Connection | None = None
        self._last_version: int | None = None
        self._leader = FileLeadership(path.with_name(path.name + ".leader"))

    async def open(self) -> None:
        """Connect (twice: one connection writes, one watches) and migrate."""

        def _open() -> None:
            self._conn = connect(self.path)
            migrate(self._conn)
            self._watch = connect(self.path)
            self._last_version = self._watch.execute("PRAGMA data_version").fetchone()[0]

        await asyncio.get_running_loop().run_in_executor(self._executor, _open)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the database thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._conn, *args))

    async def data_version(self) -> int:
        """``PRAGMA data_version`` of the watch connection: moves on every commit."""
        assert self._watch is not None
        watch = self._watch
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: watch.execute("PRAGMA data_version").fetchone()[0]
        )

    async def wait_for_change(self, timeout: float) -> bool:
        """Poll ``data_version`` until it moves (``True``) or ``timeout`` passes (``False``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            current = await self.data_version()
            if current != self._last_version:
                self._last_version = current
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(self.poll_interval_s, remaining))

    async def lead(self) -> bool:
        """Whether this process holds ``lb.db.leader`` (taken when free)."""
        return self._leader.try_acquire()

    async def close(self) -> None:
        """Close both connections, give up the duties and stop the thread."""

        def _close() -> None:
            for conn in (self._conn, self._watch):
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()

        await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)
        self._leader.release()
