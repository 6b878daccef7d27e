"""A real router keeps key usage for its ``--usage-retention-days`` and refuses to start with a
bad retention."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from llmlb.router import db
from llmlb.router.control import usage

from tests.procs import LLMLB, wait_until
from tests.router_fixtures import start_router

ADMIN = "sk-admin-retention-0123456789"
DAY = 86400


def test_the_router_deletes_usage_older_than_its_retention(spawn, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    now = int(time.time())
    conn = db.open_database(home / "lb.db")
    try:
        for days, requests in ((11, 1), (9, 2), (0, 3)):
            book = usage.UsageBook(clock=lambda d=days: now - d * DAY)
            for _ in range(requests):
                book.add("key_x", "m", "n", 5, 0, 5, False)
            usage.flush(conn, book.drain())

        def before(days: int) -> int:
            row = conn.execute(
                "SELECT COALESCE(SUM(requests), 0) FROM key_usage WHERE start < ?",
                (now - days * DAY + 3600,),
            ).fetchone()
            return int(row[0])

        assert before(10) == 1 and before(0) == 6
        start_router(spawn, home, ADMIN, "--usage-retention-days", "10")
        wait_until(lambda: before(10) == 0, timeout=15, message="the 11-day-old row deleted")
        assert before(0) == 5  # the 9-day-old row (rolled up into its hour) and today's stay
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        (("--usage-retention-days", "7"), {}, "--usage-retention-days='7'"),
        ((), {"LLMLB_USAGE_RETENTION_DAYS": "ninety"}, "LLMLB_USAGE_RETENTION_DAYS='ninety'"),
    ],
)
def test_a_bad_retention_stops_the_router_at_start_naming_it(tmp_path, flags, env, named):
    environ = {**os.environ, "LLMLB_HOME": str(tmp_path), "LLMLB_ADMIN_KEY": ADMIN, **env}
    ran = subprocess.run(
        [*LLMLB, "router", "--port", "1", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert named in ran.stderr and "from 8 (hourly roll-ups begin after a week)" in ran.stderr
    assert not (tmp_path / "lb.db").exists()  # refused before anything was written
