"""Keys: hashing, the in-memory auth cache, storage and admin key bootstrap."""

from __future__ import annotations

import logging
import stat

import pytest
from llmlb.errors import ApiError
from llmlb.router import db
from llmlb.router.control import keys


@pytest.fixture
def conn(db_target):
    """A migrated connection, on SQLite and on PostgreSQL in turn."""
    connection = db.open_database(db_target)
    yield connection
    connection.close()


def test_generated_keys_are_random_and_stored_as_hashes(conn):
    info, key = keys.create_key(conn, "api", "ci")
    other = keys.create_key(conn, "api")[1]
    assert key.startswith("sk-") and len(key) >= 43 and key != other
    stored = conn.execute(
        "SELECT key_hash, prefix FROM api_keys WHERE id = ?", (info.id,)
    ).fetchone()
    assert stored[0] == keys.hash_key(key) and key not in stored[0]
    assert stored[1] == key[:7] + "..."
    assert keys.load_hashes(conn)[keys.hash_key(key)] == "api"


def test_cache_checks_bearer_key_and_scope():
    cache = keys.KeyCache()
    cache.replace(
        {
            keys.hash_key("sk-api"): "api",
            keys.hash_key("sk-node"): "node",
            keys.hash_key("sk-admin"): "admin",
        }
    )
    assert cache.check(b"Bearer sk-api", "api") is None
    assert cache.check("bearer sk-api", "api") is None
    assert cache.check(b"Bearer sk-api", "node") == keys.FORBIDDEN
    assert cache.check(b"Bearer sk-node", "api") == keys.FORBIDDEN
    assert cache.check(b"Bearer sk-node", None) is None  # any valid key
    for scope in ("api", "node", "admin"):
        assert cache.check(b"Bearer sk-admin", scope) is None
    for bad in (None, b"", b"sk-api", b"Basic sk-api", b"Bearer ", b"Bearer sk-nope"):
        assert cache.check(bad, "api") == keys.UNAUTHENTICATED
    cache.replace({})
    assert cache.check(b"Bearer sk-api", "api") == keys.UNAUTHENTICATED


def test_env_admin_key_is_installed_and_replaced(conn, tmp_path):
    assert keys.bootstrap_admin_key(conn, tmp_path, "sk-first") is None
    assert keys.load_hashes(conn) == {keys.hash_key("sk-first"): "admin"}
    keys.bootstrap_admin_key(conn, tmp_path, "sk-first")  # idempotent
    keys.bootstrap_admin_key(conn, tmp_path, "sk-second")
    assert keys.load_hashes(conn) == {keys.hash_key("sk-second"): "admin"}
    assert not (tmp_path / keys.ADMIN_KEY_FILE).exists()
    for change in (
        lambda: keys.delete_key(conn, keys.ENV_ADMIN_KEY_ID),
        lambda: keys.update_key(conn, keys.ENV_ADMIN_KEY_ID, {"rpm": 5}),
    ):
        with pytest.raises(ApiError) as err:
            change()
        assert err.value.status == 409 and err.value.code == "key_protected"
        assert err.value.message == "this admin key is set by LLMLB_ADMIN_KEY"
    assert keys.update_key(conn, "no-such-key", {"rpm": 5}) is None
    assert keys.delete_key(conn, "no-such-key") is False


def test_generated_admin_key_file(conn, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llmlb.router"):
        path = keys.bootstrap_admin_key(conn, tmp_path, None)
    assert path == tmp_path / "admin.key"
    key = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text and key not in caplog.text
    assert keys.load_hashes(conn) == {keys.hash_key(key): "admin"}
    assert keys.bootstrap_admin_key(conn, tmp_path, None) is None  # one exists already
    assert path.read_text().strip() == key


def test_revoke_keeps_one_admin(conn, tmp_path):
    keys.bootstrap_admin_key(conn, tmp_path, None)
    (first,) = keys.list_keys(conn)
    second, _ = keys.create_key(conn, "admin")
    assert keys.delete_key(conn, first.id) is True
    with pytest.raises(ApiError, match="last admin key"):
        keys.delete_key(conn, second.id)
    assert keys.delete_key(conn, "key_missing") is False
    with pytest.raises(ValueError):
        keys.create_key(conn, "root")
