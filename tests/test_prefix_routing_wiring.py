"""The routing setting (``llmlb.config.routing``, ``ProxySettings.routing``) and how the fleet
view tells the prefix index which nodes to forget."""

from __future__ import annotations

import orjson
import pytest
from llmlb import config
from llmlb.prefix_keys import CacheReport
from llmlb.router.control.fleet import FleetView, ModelReport, NodeState, NodeView
from llmlb.router.proxy.prefix_index import PrefixIndex
from llmlb.router.proxy.proxy import InferenceProxy, ProxySettings

MODEL = "org/model"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    for name in ("LLMLB_ROUTING", "LLMLB_PROXY_ROUTING"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_prefix_is_the_default_and_env_wins_over_the_config_file(home, monkeypatch):
    assert config.routing() == "prefix" and ProxySettings.from_config().routing == "prefix"
    (home / "config.json").write_bytes(orjson.dumps({"routing": "p2c"}))
    assert ProxySettings.from_config().routing == "p2c"
    monkeypatch.setenv("LLMLB_ROUTING", "prefix")
    assert ProxySettings.from_config().routing == "prefix"
    monkeypatch.setenv("LLMLB_PROXY_ROUTING", "p2c")  # not a numeric proxy setting
    assert ProxySettings.from_config().routing == "prefix"


@pytest.mark.parametrize("value", ["P2C", "random", 1])
def test_anything_else_is_refused(home, value):
    (home / "config.json").write_bytes(orjson.dumps({"routing": value}))
    with pytest.raises(ValueError, match="prefix or p2c"):
        ProxySettings.from_config()


def node(node_id: str, online: bool = True, token: str = "t", approved: bool = True):
    view = NodeView(node_id, f"http://{node_id}:1", 4, token)
    return NodeState(view, online, {MODEL: ModelReport("ready")}, approved=approved)


def holding(index: PrefixIndex, *node_ids: str) -> None:
    for node_id in node_ids:
        index.apply(node_id, CacheReport(f"epoch-{node_id}", 1, True, {MODEL: [1, 2]}, {}))


def test_nodes_that_leave_go_offline_or_register_again_are_forgotten():
    fleet = FleetView()
    proxy = InferenceProxy(fleet, ProxySettings())
    index = proxy.index
    assert proxy.balancer.index is index
    fleet.load([node(n) for n in "abcde"], [])
    holding(index, *"abcde")
    fleet.load(
        [
            node("a"),  # unchanged
            node("b", online=False),  # offline
            node("c", token="new"),  # registered again: a new sync token
            node("d", approved=False),  # revoked: pending
        ],  # e: removed
        [],
    )
    assert sorted(index.stats()) == ["a"]
    assert fleet.member("d") == (None, False) and fleet.member("e") is None
    fleet.mark_node_offline("a")  # the proxy found nothing listening there
    assert index.stats() == {}


def test_p2c_keeps_the_index_out_of_the_balancer():
    proxy = InferenceProxy(FleetView(), ProxySettings(routing="p2c"))
    assert proxy.balancer.index is None and not proxy.prefix
