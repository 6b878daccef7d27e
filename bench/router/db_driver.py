"""psycopg 3 (sync, pooled, on the router's thread pool) against asyncpg for the router's
database calls: one registration-sized write transaction and one key lookup, sequential
(latency) and 16 at once (throughput), on a throw-away local PostgreSQL.

Run: ``.venv/bin/pip install asyncpg && .venv/bin/python -m bench.router.db_driver``
(needs Debian's ``postgresql``; asyncpg is not a dependency of llmlb). Writes the figures,
with the date and the load average before and after, to ``bench/results/db_driver.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from llmlb.router import db

from tests.postgres_fixtures import PostgresServer, postgres_bin

N = 2000
OUT = Path(__file__).resolve().parents[1] / "results" / "db_driver.json"
CONCURRENCY = 16
WRITE = "UPDATE nodes SET status='online', active_requests=?, last_seen=? WHERE id = ?"


def _psycopg_write(conn: db.Conn, i: int) -> None:
    with db.transaction(conn):
        conn.execute(WRITE, (i, time.time(), "n1"))
        db.bump(conn, db.FLEET)


def _psycopg_read(conn: db.Conn) -> object:
    return conn.execute("SELECT scope FROM api_keys WHERE id = ?", ("k",)).fetchone()


def _seed(url: str) -> str:
    """Migrate a fresh database and add the one key and node the calls use."""
    conn = db.open_database(url)
    conn.execute("INSERT INTO api_keys VALUES ('k', NULL, 'api', 'h', 'p', 't')")
    conn.execute(
        "INSERT INTO nodes (id, url, runtimes, gpu, slots, sync_token, status, models, "
        "registered_at, last_seen) "
        "VALUES ('n1', 'u', '[]', '{}', 1, 't', 'online', '[]', 'x', 0)"
    )
    conn.close()
    return url


async def _measure(call, n: int, concurrency: int) -> tuple[float, float]:
    latencies: list[float] = []

    async def worker(count: int) -> None:
        for i in range(count):
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return statistics.median(latencies) * 1e3, len(latencies) / elapsed


async def _psycopg(url: str) -> dict[str, tuple[float, float]]:
    database = db.Database(url)
    await database.open()
    results = {}
    for concurrency in (1, CONCURRENCY):
        results[f"read x{concurrency}"] = await _measure(
            lambda i: database.run(_psycopg_read), N, concurrency
        )
        results[f"write x{concurrency}"] = await _measure(
            lambda i: database.run(_psycopg_write, i), N, concurrency
        )
    await database.close()
    return results


async def _asyncpg(url: str) -> dict[str, tuple[float, float]]:
    import asyncpg

    pool = await asyncpg.create_pool(url, min_size=4, max_size=4)

    async def read(i: int) -> object:
        async with pool.acquire() as conn:
            return await conn.fetchrow("SELECT scope FROM api_keys WHERE id = $1", "k")

    async def write(i: int) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", 0x6C6C6D6C6202)
            await conn.execute(
                "UPDATE nodes SET status='online', active_requests=$1, last_seen=$2 WHERE id=$3",
                i,
                time.time(),
                "n1",
            )
            await conn.execute(
                "UPDATE state_version SET version = version + 1 WHERE name = 'fleet'"
            )
            await conn.execute("SELECT pg_notify($1, $2)", db.CHANGE_CHANNEL, db.FLEET)

    results = {}
    for concurrency in (1, CONCURRENCY):
        results[f"read x{concurrency}"] = await _measure(read, N, concurrency)
        results[f"write x{concurrency}"] = await _measure(write, N, concurrency)
    await pool.close()
    return results


def main() -> None:
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed")
    load_before = os.getloadavg()
    server = PostgresServer(bin_dir)
    server.start()
    try:
        psy = asyncio.run(_psycopg(_seed(server.create_database())))
        apg = asyncio.run(_asyncpg(_seed(server.create_database())))
    finally:
        server.remove()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "calls_per_measure": N,
    }
    figures = {
        name: {"psycopg_p50_ms": psy[name][0], "psycopg_ops_s": psy[name][1],
               "asyncpg_p50_ms": apg[name][0], "asyncpg_ops_s": apg[name][1]}
        for name in psy
    }  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "figures": figures}, indent=1) + "\n")
    print(f"{'call':<10} {'psycopg p50 ms':>15} {'ops/s':>8} {'asyncpg p50 ms':>15} {'ops/s':>8}")
    for name in psy:
        (pl, pt), (al, at) = psy[name], apg[name]
        print(f"{name:<10} {pl:>15.3f} {pt:>8.0f} {al:>15.3f} {at:>8.0f}")


if __name__ == "__main__":
    main()
