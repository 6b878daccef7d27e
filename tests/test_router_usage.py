"""Usage accounting storage (llmlb.router.control.usage): batches, roll-ups, retention and
queries, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from llmlb.errors import ApiError
from llmlb.router import db
from llmlb.router.control import usage

NOW = 1_800_000_000  # a whole hour


@pytest.fixture
def conn(db_target):
    connection = db.open_database(db_target)
    yield connection
    connection.close()


def _book(at: float, *rows: tuple) -> usage.UsageBook:
    book = usage.UsageBook(clock=lambda: at)
    for row in rows:
        book.add(*row)
    return book


def test_batches_add_up_per_key_model_node_and_minute(conn):
    book = _book(NOW + 5, ("k1", "m", "n1", 10, 2, 5, False), ("k1", "m", "n1", 1, 0, 1, True))
    usage.flush(conn, book.drain())
    usage.flush(conn, _book(NOW + 50, ("k1", "m", "n1", 4, 0, 4, False)).drain())  # same minute
    usage.flush(conn, _book(NOW + 61, ("k2", "m", "n2", 7, 7, 1, False)).drain())
    span = {"from": str(NOW), "to": str(NOW + 120)}
    query = usage.parse_query({"group_by": "key,minute", **span}, NOW)
    rows = usage.query(conn, query)
    assert rows == [
        {"key": "k1", "minute": db.iso_from_unix(NOW), "requests": 3, "prompt_tokens": 15,
         "cached_tokens": 2, "completion_tokens": 10, "errors": 1, "total_tokens": 25},
        {"key": "k2", "minute": db.iso_from_unix(NOW + 60), "requests": 1, "prompt_tokens": 7,
         "cached_tokens": 7, "completion_tokens": 1, "errors": 0, "total_tokens": 8},
    ]  # fmt: skip
    assert usage.spent(conn, ["k1", "k2", "k3"], NOW) == {"k1": 25, "k2": 8}
    assert "model,requests" in usage.to_csv(usage.query(conn, usage.parse_query(
        {"group_by": "model", "from": str(NOW)}, NOW + 120)), ("model",))


def test_a_failed_write_keeps_the_rows_for_the_next(conn):
    book = _book(NOW, ("k", "m", "n", 1, 0, 1, False))
    rows = book.drain()
    book.add("k", "m", "n", 2, 0, 2, False)
    book.restore(rows)  # the write failed: merged with what came since
    usage.flush(conn, book.drain())
    assert usage.spent(conn, ["k"], 0) == {"k": 6}


def test_minutes_older_than_a_week_become_hours_and_the_retention_deletes(conn):
    week = usage.MINUTE_ROWS_S
    old = NOW - week - 2 * 3600  # two hours before the roll-up line, minute rows
    for offset in (0, 60, 3599, 3600):
        usage.flush(conn, _book(old + offset, ("k", "m", "n", 10, 0, 5, False)).drain())
    ancient = NOW - 91 * 86400
    usage.flush(conn, _book(ancient, ("k", "m", "n", 1, 0, 1, False)).drain())
    recent = NOW - 60
    usage.flush(conn, _book(recent, ("k", "m", "n", 3, 0, 3, False)).drain())
    before = usage.spent(conn, ["k"], ancient + 1)["k"]
    usage.compact(conn, NOW, retention_days=90)
    spans = conn.execute("SELECT span, start, requests FROM key_usage ORDER BY start").fetchall()
    assert [(row[0], row[1], row[2]) for row in spans] == [
        (3600, old, 3),  # three minutes of the first hour, rolled up
        (3600, old + 3600, 1),
        (60, recent - recent % 60, 1),  # this week's minutes stay
    ]
    assert usage.spent(conn, ["k"], ancient + 1)["k"] == before  # nothing lost but the ancient
    usage.compact(conn, NOW, retention_days=90)  # idempotent
    assert len(conn.execute("SELECT * FROM key_usage").fetchall()) == 3


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "colour"}, "group_by"),
        ({"group_by": "minute,hour"}, "group_by"),
        ({"group_by": ""}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"to": "99999999999999"}, "to"),
        ({"key": "a\x00b"}, "key"),
        ({"sort": "x"}, "sort"),
    ],
)
def test_bad_queries_are_400_naming_the_parameter(params, field):
    with pytest.raises(ApiError) as info:
        usage.parse_query(params, NOW)
    assert info.value.status == 400 and info.value.param == field
