"""FleetView: readiness index, model status, change notification, marking nodes offline."""

from __future__ import annotations

import asyncio
import time

from llmlb.router.control.fleet import FleetView, ModelReport, NodeState, NodeView, RegisteredModel


def _node(node_id: str, online: bool = True, **models: str) -> NodeState:
    view = NodeView(node_id, f"http://{node_id}:1", 2)
    reports = {k.replace("__", "/"): ModelReport(v, "gguf", 10) for k, v in models.items()}
    return NodeState(view, online, reports)


def _fleet(offline: list[str] | None = None) -> FleetView:
    fleet = FleetView(on_offline=(offline.append if offline is not None else None))
    fleet.load(
        [
            _node("a", acme__one="ready", acme__two="downloading"),
            _node("b", acme__one="ready", acme__three="loading", local__disk="ready"),
            _node("c", online=False, acme__two="ready"),
        ],
        [
            RegisteredModel("acme/one", "Acme/One", "gguf", 10, 1),
            RegisteredModel("acme/two", "Acme/Two", "gguf", 20, 2),
            RegisteredModel("acme/four", "Acme/Four", "gguf", 40, 4),
        ],
    )
    return fleet


def test_ready_nodes_and_status():
    fleet = _fleet()
    assert [n.node_id for n in fleet.ready_nodes("acme/one")] == ["a", "b"]
    assert fleet.ready_nodes("acme/two") == []  # only the offline node has it ready
    assert fleet.model_status("acme/one") == "ready"
    assert fleet.model_status("acme/two") == "pending"
    assert fleet.model_status("acme/three") == "pending"  # reported, not registered
    assert fleet.model_status("acme/four") == "registered"
    assert fleet.model_status("acme/five") == "unknown"
    assert fleet.model_status("local/disk") == "ready"


def test_model_entries_merge_registered_and_reported():
    entries = {e["id"]: e for e in _fleet().model_entries()}
    assert set(entries) == {"acme/one", "acme/two", "acme/three", "acme/four", "local/disk"}
    assert entries["acme/one"]["nodes_ready"] == 2 and entries["acme/one"]["ready"] is True
    assert entries["acme/two"]["ready"] is False and entries["acme/two"]["repo"] == "Acme/Two"
    assert entries["local/disk"]["repo"] is None and entries["local/disk"]["size_bytes"] == 10


def test_mark_node_offline_takes_it_out_and_reports_once():
    offline: list[str] = []
    fleet = _fleet(offline)
    fleet.mark_node_offline("a")
    fleet.mark_node_offline("a")
    fleet.mark_node_offline("ghost")
    assert offline == ["a"]
    assert [n.node_id for n in fleet.ready_nodes("acme/one")] == ["b"]
    assert fleet.model_status("acme/two") == "registered"


def test_wait_for_change():
    async def scenario() -> tuple[float, float]:
        fleet = _fleet()
        start = time.monotonic()
        await fleet.wait_for_change(0.05)
        timed_out = time.monotonic() - start
        waiter = asyncio.create_task(fleet.wait_for_change(60))
        await asyncio.sleep(0)
        start = time.monotonic()
        fleet.mark_node_offline("b")
        await waiter
        return timed_out, time.monotonic() - start

    timed_out, woke = asyncio.run(scenario())
    assert timed_out >= 0.05 and woke < 30  # woken by the change, long before its 60 s


def test_only_nodes_that_can_serve_a_model_are_ready_for_it():
    def holder(node_id: str, servable: bool, runtimes: tuple[str, ...]) -> NodeState:
        report = ModelReport("ready", "safetensors", 10, servable)
        view = NodeView(node_id, f"http://{node_id}:1", 2)
        return NodeState(view, True, {"acme/st": report}, runtimes)

    fleet = FleetView()
    registered = [RegisteredModel("acme/st", "Acme/St", "safetensors", 10, 1)]
    fleet.load([holder("a", False, ("llama.cpp",)), holder("b", False, ("other",))], registered)
    assert fleet.ready_nodes("acme/st") == []
    assert fleet.model_status("acme/st") == "unservable"
    assert fleet.incapable("acme/st") == ("safetensors", ["llama.cpp", "other"])
    assert fleet.model_entry("acme/st")["ready"] is False
    fleet.load([holder("a", False, ("llama.cpp",)), holder("c", True, ("vllm",))], registered)
    assert [n.node_id for n in fleet.ready_nodes("acme/st")] == ["c"]
    assert fleet.model_status("acme/st") == "ready"
    assert fleet.model_entry("acme/st")["ready"] is True
    assert fleet.model_entry("acme/st")["nodes_ready"] == 1
    assert fleet.node_online("c") and not fleet.node_online("ghost")
