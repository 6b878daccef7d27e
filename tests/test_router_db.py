"""The router's SQLite file: WAL, migrations, transactions, change detection."""

from __future__ import annotations

import sqlite3

import pytest
from llmlb.router import db


def test_migrations_bring_a_new_file_to_the_latest_version(tmp_path):
    conn = db.open_database(tmp_path / "lb.db")
    assert db.schema_version(conn) == len(db.MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.migrate(conn) == len(db.MIGRATIONS)  # idempotent
    assert db.versions(conn) == {"keys": 0, "fleet": 0}
    conn.close()


def test_a_newer_schema_is_refused(tmp_path):
    conn = db.open_database(tmp_path / "lb.db")
    conn.execute(f"PRAGMA user_version = {len(db.MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        db.migrate(conn)


def test_transactions_roll_back_on_error(tmp_path):
    conn = db.open_database(tmp_path / "lb.db")
    with pytest.raises(sqlite3.IntegrityError), db.transaction(conn):
        db.bump(conn, db.KEYS)
        conn.execute("INSERT INTO state_version (name, version) VALUES ('keys', 1)")
    assert db.versions(conn)["keys"] == 0


def test_data_version_moves_on_commits_from_other_connections(tmp_path):
    writer = db.open_database(tmp_path / "lb.db")
    watcher = db.connect(tmp_path / "lb.db")
    before = db.data_version(watcher)
    assert db.data_version(watcher) == before
    with db.transaction(writer):
        db.bump(writer, db.FLEET)
    assert db.data_version(watcher) != before
    assert db.versions(watcher)["fleet"] == 1
