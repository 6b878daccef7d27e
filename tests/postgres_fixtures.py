"""A real PostgreSQL server for the tests that need one: Debian's binaries
(``/usr/lib/postgresql/*/bin``, installed by ``.ci/run``), a throw-away cluster on a loopback
port, and a fresh database per test.

``initdb`` and ``postgres`` refuse to run as root, so as root the cluster belongs to the
``postgres`` user and both run through ``runuser``. Durability is off (fsync, synchronous
commit): the cluster lives for one test session.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, wait_until
from tests.requirements import missing

SUPERUSER = "postgres"


def postgres_bin() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<version>/bin``, if any."""
    versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    versions.sort(key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SUPERUSER, "--", *argv] if os.geteuid() == 0 else argv


class PostgresServer:
    """One cluster: ``initdb`` once, then ``start`` / ``stop`` (same port and data) at will.

    Args:
        bin_dir: where ``initdb`` and ``postgres`` are.
    """

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="llmlb-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self._proc: subprocess.Popen | None = None
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            shutil.chown(self.root, SUPERUSER, SUPERUSER)
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.socket_dir, SUPERUSER, SUPERUSER)
        subprocess.run(
            _as_owner(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def url(self, database: str = "postgres") -> str:
        """``postgresql://`` URL of ``database`` over loopback TCP."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the server and wait until it takes connections."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self._proc = subprocess.Popen(
            _as_owner(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.socket_dir),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_until(self._accepts, timeout=30, interval=0.05, message="postgres to start")

    def _accepts(self) -> bool:
        import psycopg

        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.log_path.read_text()[-2000:]}")
        try:
            psycopg.connect(self.url(), connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are cut) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # runuser passes SIGINT on to postgres: "fast" shutdown.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        """Stop and delete the cluster."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def make_server() -> PostgresServer:
    """A started cluster; the test is skipped where PostgreSQL is not installed (except in
    CI, where ``.ci/run`` installs it and its absence is a failure)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing("PostgreSQL is not installed (apt-get install postgresql)",
                ".ci/run installs postgresql")
    server = PostgresServer(bin_dir)
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session."""
    server = make_server()
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a fresh database on the session's cluster."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of the test's own, which it may stop and start (an outage)."""
    server = make_server()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request, tmp_path) -> str | Path:
    """Each backend in turn: a SQLite file, then a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / "lb.db"
    return request.getfixturevalue("postgres_url")
