"""How long key usage is kept: the router's ``usage_retention_days`` (``--usage-retention-days``
> ``LLMLB_USAGE_RETENTION_DAYS`` > ``config.json`` > 90), validated at start, and what
:func:`llmlb.router.control.usage.compact` deletes with it (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from llmlb import config
from llmlb.cli.main import build_parser
from llmlb.cli.router import _settings
from llmlb.router import db
from llmlb.router.control import usage
from llmlb.router.control.settings import SETTINGS_ENV, RouterSettings

NOW = 1_800_000_000  # a whole hour
DAY = 86400


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    for name in ("LLMLB_USAGE_RETENTION_DAYS", "LLMLB_ROUTER_DB", SETTINGS_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _settings_of(*flags: str) -> RouterSettings:
    return _settings(build_parser("router").parse_args(["router", *flags]))[0]


def test_the_flag_wins_over_the_environment_which_wins_over_config_json(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _settings_of().usage_retention_days == 90
    (home / "config.json").write_bytes(orjson.dumps({"usage_retention_days": 30}))
    assert _settings_of().usage_retention_days == 30
    monkeypatch.setenv("LLMLB_USAGE_RETENTION_DAYS", "14")
    assert _settings_of().usage_retention_days == 14
    settings = _settings_of("--usage-retention-days", "400")
    assert settings.usage_retention_days == 400
    assert RouterSettings.from_json(settings.to_json()).usage_retention_days == 400  # workers


@pytest.mark.parametrize("value", ["7", "0", "-30", "ten", "1.5", "", " ", "36501", "9" * 30])
def test_a_bad_flag_is_a_startup_error_naming_it(home: Path, value: str) -> None:
    with pytest.raises(ValueError, match="--usage-retention-days=.*8 .*36500"):
        _settings_of("--usage-retention-days", value)


@pytest.mark.parametrize("value", ["7", "0", "-1", "x", "1e3"])
def test_a_bad_environment_value_is_a_startup_error_naming_it(
    home: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LLMLB_USAGE_RETENTION_DAYS", value)
    with pytest.raises(ValueError, match="LLMLB_USAGE_RETENTION_DAYS="):
        _settings_of()


@pytest.mark.parametrize(("value", "days"), [(None, 90), ("45", 45), (45, 45)])
def test_config_json_takes_a_whole_number(home: Path, value: object, days: int) -> None:
    (home / "config.json").write_bytes(orjson.dumps({"usage_retention_days": value}))
    assert config.usage_retention_days() == days


@pytest.mark.parametrize("value", [7, True, 9.5, "x", [30], 10**12])
def test_a_bad_config_json_value_is_a_startup_error_naming_it(home: Path, value: object) -> None:
    (home / "config.json").write_bytes(orjson.dumps({"usage_retention_days": value}))
    with pytest.raises(ValueError, match="config.json usage_retention_days="):
        _settings_of()


@pytest.fixture
def conn(db_target):
    connection = db.open_database(db_target)
    yield connection
    connection.close()


def _add(conn: db.Conn, at: int, requests: int) -> None:
    book = usage.UsageBook(clock=lambda: at)
    for _ in range(requests):
        book.add("k", "m", "n", 1, 0, 1, False)
    usage.flush(conn, book.drain())


def _kept(conn: db.Conn) -> list[tuple[int, int]]:
    rows = conn.execute("SELECT start, requests FROM key_usage ORDER BY start").fetchall()
    return [(int(row[0]), int(row[1])) for row in rows]


def test_compact_deletes_what_began_before_the_retention_and_keeps_the_rest(conn) -> None:
    retention = 12
    gone = NOW - retention * DAY - 3600  # an hour past a 12-day retention
    edge = NOW - retention * DAY  # began exactly 12 days ago: kept
    inside = NOW - (retention - 1) * DAY  # rolled up into an hour row, kept
    recent = NOW - 120  # a minute row of this week, kept as it is
    for at, requests in ((gone, 1), (edge, 2), (inside, 3), (inside + 60, 4), (recent, 5)):
        _add(conn, at, requests)
    usage.compact(conn, NOW, retention_days=retention)
    assert _kept(conn) == [(edge, 2), (inside, 7), (recent, 5)]
    usage.compact(conn, NOW + DAY, retention_days=retention)  # a day later the edge row goes
    assert _kept(conn) == [(inside, 7), (recent, 5)]


def test_the_default_retention_keeps_what_a_shorter_one_deletes(conn) -> None:
    _add(conn, NOW - 20 * DAY, 1)
    _add(conn, NOW - 91 * DAY, 1)
    usage.compact(conn, NOW)
    assert _kept(conn) == [(NOW - 20 * DAY, 1)]
    usage.compact(conn, NOW, retention_days=19)
    assert _kept(conn) == []
