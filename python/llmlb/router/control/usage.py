"""Usage accounting: requests and tokens per key, model, node and minute.

The proxy adds every finished request of a key to this worker's :class:`UsageBook` (a dict
in memory, no I/O); the runtime drains it into ``key_usage`` once a second (:func:`flush`,
one transaction of upserts), so a SIGKILL loses at most the last second. Rows are per
minute (``span`` 60) for :data:`MINUTE_ROWS_S` (a week), then rolled up into hours (``span``
3600) and deleted after the retention (``--usage-retention-days``, 90 by default) by
:func:`compact`.

:func:`query` answers ``GET /v0/usage`` (and ``/v0/usage/self``); :func:`spent` the tokens a
key used since a time (its budget period).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmlb import config
from llmlb.errors import ApiError
from llmlb.router import db

MINUTE = 60
HOUR = 3600
DAY = 86400
MINUTE_ROWS_S = 7 * DAY  # minute rows older than this are rolled up into hours
DEFAULT_RETENTION_DAYS = config.DEFAULT_USAGE_RETENTION_DAYS
COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "errors")
GROUPS = ("key", "model", "node", "minute", "hour", "day")
_COLUMNS = {"key": "key_id", "model": "model", "node": "node"}
_BUCKETS = {"minute": MINUTE, "hour": HOUR, "day": DAY}
MAX_ROWS = 100_000

# (start, key_id, model, node) -> [requests, prompt, cached, completion, errors]
Rows = dict[tuple[int, str, str, str], list[int]]


class UsageBook:
    """One worker's usage not yet written, by (minute, key, model, node)."""

    __slots__ = ("rows", "clock")

    def __init__(self, clock: Any = time.time) -> None:
        self.rows: Rows = {}
        self.clock = clock

    def add(
        self,
        key_id: str,
        model: str,
        node: str,
        prompt: int,
        cached: int,
        completion: int,
        error: bool,
    ) -> None:
        """Count one finished request."""
        minute = int(self.clock()) // MINUTE * MINUTE
        row = self.rows.get((minute, key_id, model, node))
        if row is None:
            self.rows[(minute, key_id, model, node)] = [1, prompt, cached, completion, int(error)]
            return
        row[0] += 1
        row[1] += prompt
        row[2] += cached
        row[3] += completion
        row[4] += error

    def drain(self) -> Rows:
        """Take every row (to be written)."""
        rows, self.rows = self.rows, {}
        return rows

    def restore(self, rows: Rows) -> None:
        """Put back rows whose write failed (merged with what came since)."""
        for k, counts in rows.items():
            mine = self.rows.get(k)
            if mine is None:
                self.rows[k] = counts
            else:
                for i, value in enumerate(counts):
                    mine[i] += value


_UPSERT = (
    "INSERT INTO key_usage (start, span, key_id, model, node, requests, prompt_tokens, "
    "cached_tokens, completion_tokens, errors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (start, span, key_id, model, node) DO UPDATE SET "
    "requests = key_usage.requests + excluded.requests, "
    "prompt_tokens = key_usage.prompt_tokens + excluded.prompt_tokens, "
    "cached_tokens = key_usage.cached_tokens + excluded.cached_tokens, "
    "completion_tokens = key_usage.completion_tokens + excluded.completion_tokens, "
    "errors = key_usage.errors + excluded.errors"
)


def flush(conn: db.Conn, rows: Rows) -> None:
    """Add ``rows`` to the stored minutes, in one transaction."""
    if not rows:
        return
    params = [(k[0], MINUTE, k[1], k[2], k[3], *counts) for k, counts in rows.items()]
    with db.transaction(conn):
        conn.executemany(_UPSERT, params)


def compact(conn: db.Conn, now: float, retention_days: int = DEFAULT_RETENTION_DAYS) -> int:
    """Roll minute rows older than a week up into hours and delete every row that began more
    than ``retention_days`` before ``now`` (the router's ``usage_retention_days``, at least
    8: longer than the minute rows last); returns the rows removed."""
    cutoff = int(now) - MINUTE_ROWS_S
    cutoff -= cutoff % HOUR  # whole hours only, so an hour is rolled up once
    expired = int(now) - retention_days * DAY
    with db.transaction(conn):
        old = conn.execute(
            "SELECT (start / 3600) * 3600, key_id, model, node, SUM(requests), "
            "SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), SUM(errors) "
            "FROM key_usage WHERE span = 60 AND start < ? "
            "GROUP BY (start / 3600) * 3600, key_id, model, node",
            (cutoff,),
        ).fetchall()
        if old:
            conn.executemany(
                _UPSERT, [(r[0], HOUR, r[1], r[2], r[3], *[int(v) for v in r[4:9]]) for r in old]
            )
        removed = conn.execute(
            "DELETE FROM key_usage WHERE (span = 60 AND start < ?) OR start < ?",
            (cutoff, expired),
        ).rowcount
    return max(0, removed or 0)


def spent(conn: db.Conn, key_ids: list[str], since: float) -> dict[str, int]:
    """Tokens (prompt + completion) each key used since ``since`` (a period's start)."""
    if not key_ids:
        return {}
    marks = ",".join("?" for _ in key_ids)
    rows = conn.execute(
        "SELECT key_id, SUM(prompt_tokens + completion_tokens) FROM key_usage "
        f"WHERE start >= ? AND key_id IN ({marks}) GROUP BY key_id",
        (int(since), *key_ids),
    ).fetchall()
    return {row[0]: int(row[1] or 0) for row in rows}


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What ``GET /v0/usage`` asks: filters, a time range, and the grouping."""

    key: str | None
    model: str | None
    start: int
    end: int
    group_by: tuple[str, ...]


_LATEST = 253402300799  # 9999-12-31T23:59:59Z


def _time(value: str, field: str) -> int:
    bad = ApiError(
        400,
        "invalid_request_error",
        f"'{field}' must be an RFC 3339 time or unix seconds (up to year 9999)",
        param=field,
    )
    if value.isdigit():
        if len(value) > 12 or int(value) > _LATEST:
            raise bad
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0, int(moment.timestamp()))


def parse_query(params: Any, now: float) -> UsageQuery:
    """Read ``key``, ``model``, ``from``, ``to`` (default: the last 24 hours) and
    ``group_by`` (comma-separated of key, model, node, minute, hour, day; default key,model).

    Raises:
        ApiError: 400 naming the parameter.
    """
    for name in params:
        if name not in ("key", "model", "from", "to", "group_by", "format"):
            raise ApiError(
                400, "invalid_request_error", f"unknown parameter '{name}'", param=name
            )
    for name in ("key", "model"):
        if "\x00" in (params.get(name) or ""):
            raise ApiError(400, "invalid_request_error", f"'{name}' has a NUL", param=name)
    end = _time(params["to"], "to") if "to" in params else int(now) + 1
    start = _time(params["from"], "from") if "from" in params else end - DAY
    raw = params.get("group_by", "key,model")
    group_by = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    for part in group_by:
        if part not in GROUPS:
            raise ApiError(
                400,
                "invalid_request_error",
                f"'group_by' takes {', '.join(GROUPS)}; not '{part}'",
                param="group_by",
            )
    if not group_by:
        raise ApiError(
            400, "invalid_request_error", "'group_by' names no group", param="group_by"
        )
    if sum(part in _BUCKETS for part in group_by) > 1:
        raise ApiError(
            400, "invalid_request_error", "group by one of minute, hour, day", param="group_by"
        )
    return UsageQuery(params.get("key") or None, params.get("model") or None, start, end, group_by)


def query(conn: db.Conn, q: UsageQuery) -> list[dict[str, Any]]:
    """Sums of the counters over ``q``'s range, one row per group (at most
    :data:`MAX_ROWS`), ordered by group."""
    select: list[str] = []
    names: list[str] = []
    for part in q.group_by:
        if part in _BUCKETS:
            span = _BUCKETS[part]
            select.append(f"(start / {span}) * {span}")
        else:
            select.append(_COLUMNS[part])
        names.append(part)
    where = ["start >= ?", "start < ?"]
    params: list[Any] = [q.start, q.end]
    if q.key is not None:
        where.append("key_id = ?")
        params.append(q.key)
    if q.model is not None:
        where.append("model = ?")
        params.append(q.model)
    sums = ", ".join(f"SUM({c})" for c in COUNTERS)
    sql = f"SELECT {', '.join([*select, sums])} FROM key_usage WHERE {' AND '.join(where)}"
    if select:
        sql += f" GROUP BY {', '.join(select)} ORDER BY {', '.join(select)}"
    sql += f" LIMIT {MAX_ROWS}"
    out = []
    for row in conn.execute(sql, params).fetchall():
        counts = [int(v or 0) for v in row[len(select) :]]
        if not select and counts[0] == 0:
            continue
        item: dict[str, Any] = {}
        for name, value in zip(names, row[: len(select)], strict=True):
            item[name] = db.iso_from_unix(int(value)) if name in _BUCKETS else value
        item.update(zip(COUNTERS, counts, strict=True))
        item["total_tokens"] = item["prompt_tokens"] + item["completion_tokens"]
        out.append(item)
    return out


def to_csv(rows: list[dict[str, Any]], group_by: tuple[str, ...]) -> str:
    """``rows`` as CSV with a header line."""
    import csv
    import io

    columns = [*group_by, *COUNTERS, "total_tokens"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(column, "") for column in columns])
    return buffer.getvalue()
