"""The router's database setting and a node's router list (``llmlb.config``)."""

from __future__ import annotations

import orjson
import pytest
from llmlb import config

PG = "postgresql://llmlb@db.example:5432/llmlb"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMLB_ROUTER_DB", raising=False)
    monkeypatch.delenv("LLMLB_ROUTER_URL", raising=False)
    return tmp_path


def test_sqlite_in_the_home_is_the_default(home):
    assert config.router_db() == (home / "lb.db").absolute()


def test_flag_over_env_over_config_file(home, monkeypatch):
    (home / "config.json").write_bytes(orjson.dumps({"db": PG}))
    assert config.router_db() == PG
    monkeypatch.setenv("LLMLB_ROUTER_DB", str(home / "env.db"))
    assert config.router_db() == home / "env.db"
    assert config.router_db("postgres://u@h/d") == "postgres://u@h/d"
    assert config.router_db_path() == home / "env.db"


def test_a_config_file_db_must_be_a_string(home):
    (home / "config.json").write_bytes(orjson.dumps({"db": 5}))
    with pytest.raises(ValueError, match="'db' must be a string"):
        config.router_db()


def test_router_lists(home, monkeypatch):
    assert config.router_urls() == [config.DEFAULT_ROUTER_URL]
    monkeypatch.setenv("LLMLB_ROUTER_URL", "http://a:1/, http://b:2,,http://a:1")
    assert config.router_urls() == ["http://a:1", "http://b:2"]
    assert config.router_url() == "http://a:1"  # CLI tools talk to the first
    assert config.router_urls("") == []
    assert config.router_urls("http://c:3/") == ["http://c:3"]
