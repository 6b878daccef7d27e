"""The router's node approval setting (``llmlb.config.node_approval``, ``RouterSettings``)."""

from __future__ import annotations

import orjson
import pytest
from llmlb import config
from llmlb.router.control.settings import RouterSettings


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMLB_NODE_APPROVAL", raising=False)
    monkeypatch.delenv("LLMLB_ROUTER_DB", raising=False)
    return tmp_path


def test_manual_is_the_default(home):
    assert config.node_approval() == "manual"
    settings = RouterSettings.from_env()
    assert settings.node_approval == "manual" and not settings.auto_approve


def test_env_over_config_file(home, monkeypatch):
    (home / "config.json").write_bytes(orjson.dumps({"node_approval": "auto"}))
    assert config.node_approval() == "auto" and RouterSettings.from_env().auto_approve
    monkeypatch.setenv("LLMLB_NODE_APPROVAL", "manual")
    assert config.node_approval() == "manual"


@pytest.mark.parametrize("value", ["yes", "AUTO", 1, True])
def test_anything_else_is_refused(home, value):
    (home / "config.json").write_bytes(orjson.dumps({"node_approval": value}))
    with pytest.raises(ValueError, match="auto or manual"):
        config.node_approval()
