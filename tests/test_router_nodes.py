"""Node registry: payload validation, heartbeats, offline detection."""

from __future__ import annotations

import pytest
from llmlb.errors import ApiError
from llmlb.router import db, nodes


@pytest.fixture
def conn(tmp_path):
    connection = db.open_database(tmp_path / "lb.db")
    yield connection
    connection.close()


def test_registration_parsing():
    reg = nodes.Registration.parse(
        {
            "node_id": "gpu-1",
            "url": "http://10.0.0.2:32769/",
            "runtimes": ["llama_cpp"],
            "gpu": {"backend": "cuda"},
            "slots": 4.0,
            "models": [
                "Org/Hand",
                {"id": "Org/M", "status": "downloading", "progress": {"bytes": 1, "total": 2}},
            ],
        }
    )
    assert reg.url == "http://10.0.0.2:32769" and reg.slots == 4
    assert reg.models == [
        {"id": "org/hand", "state": "ready"},
        {"id": "org/m", "state": "downloading", "progress": {"bytes": 1, "total": 2}},
    ]
    assert nodes.Registration.parse({"url": "https://n"}).node_id.startswith("node-")


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://n"},
        {"url": "http://n:99999"},
        {"url": "http://n?x=1"},
        {},
        {"url": "http://n", "node_id": "a b"},
        {"url": "http://n", "slots": 0},
        {"url": "http://n", "slots": True},
        {"url": "http://n", "slots": 10**7},
        {"url": "http://n", "gpu": []},
        {"url": "http://n", "runtimes": [1]},
        {"url": "http://n", "models": [{"id": "a", "state": "nope"}]},
        {"url": "http://n", "models": [{"id": "a/../b"}]},
        {"url": "http://n", "models": [{"id": "a", "progress": {"bytes": "x"}}]},
        {"url": "http://n", "models": [{"id": "a", "error": 3}]},
    ],
)
def test_registration_rejects(body):
    with pytest.raises(ApiError) as err:
        nodes.Registration.parse(body)
    assert err.value.status == 400


def test_heartbeat_bumps_the_fleet_version_only_on_state_changes(conn):
    nodes.register(conn, nodes.Registration.parse({"node_id": "n", "url": "http://n"}))
    version = db.versions(conn)["fleet"]
    ready = nodes.Heartbeat.parse(
        {"models": [{"id": "a", "state": "downloading", "progress": {"bytes": 1, "total": 9}}]}
    )
    assert nodes.heartbeat(conn, "n", ready)
    assert db.versions(conn)["fleet"] == version + 1
    progress = nodes.Heartbeat.parse(
        {
            "models": [{"id": "a", "state": "downloading", "progress": {"bytes": 5, "total": 9}}],
            "active_requests": 3,
        }
    )
    assert nodes.heartbeat(conn, "n", progress)
    assert db.versions(conn)["fleet"] == version + 1  # progress alone: no cache reload
    assert nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({"slots": 8}))
    assert db.versions(conn)["fleet"] == version + 2
    (listed,) = nodes.list_nodes(conn, 60)
    assert listed["active_requests"] == 0 and listed["slots"] == 8
    assert listed["models"][0]["progress"] == {"bytes": 5, "total": 9}
    assert not nodes.heartbeat(conn, "ghost", progress)


def test_silent_nodes_go_offline_and_come_back(conn):
    nodes.register(conn, nodes.Registration.parse({"node_id": "n", "url": "http://n"}))
    assert nodes.reap(conn, 60) == 0
    conn.execute("UPDATE nodes SET last_seen = last_seen - 100")
    assert nodes.list_nodes(conn, 60)[0]["status"] == "offline"
    assert nodes.reap(conn, 60) == 1
    assert [s.online for s in nodes.load_states(conn)] == [False]
    assert nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({}))
    assert [s.online for s in nodes.load_states(conn)] == [True]
    assert nodes.sync_target(conn, "n")[0] == "http://n"
    assert nodes.unregister(conn, "n") and nodes.sync_target(conn, "n") is None
