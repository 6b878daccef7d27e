"""Node registry: payload validation, heartbeats, offline detection."""

from __future__ import annotations

import sqlite3

import pytest
from llmlb.errors import ApiError
from llmlb.protocol import PeerReport
from llmlb.router import db
from llmlb.router.control import nodes
from llmlb.router.control.fleet import FleetView


@pytest.fixture
def conn(db_target):
    """A migrated connection, on SQLite and on PostgreSQL in turn."""
    connection = db.open_database(db_target)
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


SECRET_A = "secret-a-0123456789abcdef"
SECRET_B = "secret-b-0123456789abcdef"


def _reg(secret: str | None = None, url: str = "http://n") -> nodes.Registration:
    body = {"node_id": "n", "url": url}
    if secret is not None:
        body["node_secret"] = secret
    return nodes.Registration.parse(body)


def _conflict(call) -> None:
    with pytest.raises(ApiError) as err:
        call()
    assert (err.value.status, err.value.code) == (409, "node_id_conflict")


def test_a_node_id_is_bound_to_the_secret_that_registered_it(conn):
    nodes.register(conn, _reg(SECRET_A), b"sk-shared-node-key")
    # Any other credential, with the same node key or not, cannot take the id over.
    _conflict(lambda: nodes.register(conn, _reg(SECRET_B, "http://evil"), b"sk-shared-node-key"))
    _conflict(lambda: nodes.register(conn, _reg(None, "http://evil"), b"sk-shared-node-key"))
    assert nodes.sync_target(conn, "n")[0] == "http://n"
    # Nor speak for it in heartbeats or remove it with a node key.
    _conflict(lambda: nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({}), b"sk-shared-node-key"))
    wrong = nodes.Heartbeat.parse({"node_secret": SECRET_B, "models": ["x"]})
    _conflict(lambda: nodes.heartbeat(conn, "n", wrong))
    _conflict(lambda: nodes.unregister(conn, "n", b"sk-shared-node-key"))
    assert nodes.list_nodes(conn, 60)[0]["models"] == []
    # The node itself re-registers (new URL, same secret) and heartbeats.
    nodes.register(conn, _reg(SECRET_A, "http://moved"), b"another-key")
    assert nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({"node_secret": SECRET_A}))
    # An admin removes it; then the id is free for another credential.
    assert nodes.unregister(conn, "n", None, force=True)
    nodes.register(conn, _reg(SECRET_B), None)
    _conflict(lambda: nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({"node_secret": SECRET_A})))
    stored = conn.execute("SELECT credential_hash FROM nodes").fetchone()[0]
    assert SECRET_B not in stored and len(stored) == 64  # only a hash is kept


def test_without_a_secret_the_id_is_bound_to_the_key(conn):
    nodes.register(conn, _reg(), b"sk-key-1")
    assert nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({}), b"sk-key-1")
    _conflict(lambda: nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({}), b"sk-key-2"))
    _conflict(lambda: nodes.register(conn, _reg(), b"sk-key-2"))
    assert nodes.unregister(conn, "n", b"sk-key-1")


@pytest.mark.parametrize("secret", ["short", "with space in the secret", 12, "x" * 257])
def test_a_malformed_secret_is_refused(secret):
    for parse in (nodes.Registration.parse, nodes.Heartbeat.parse):
        with pytest.raises(ApiError) as err:
            parse({"url": "http://n", "node_secret": secret})
        assert err.value.status == 400


def test_a_database_from_before_bindings_migrates_and_its_nodes_rebind(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for statement in db.MIGRATIONS[0]:
        old.execute(statement)
    old.execute(
        "INSERT INTO nodes (id, url, runtimes, gpu, slots, sync_token, status, models, "
        "registered_at, last_seen) VALUES ('n', 'http://n', '[]', '{}', 1, 't', 'online', "
        "'[]', '2025-01-01T00:00:00.000Z', 0)"
    )
    old.execute("PRAGMA user_version = 1")
    old.commit()
    old.close()
    conn = db.open_database(path)
    assert db.schema_version(conn) == len(db.MIGRATIONS)
    assert nodes.heartbeat(conn, "n", nodes.Heartbeat.parse({}), b"any")  # unbound: accepted
    nodes.register(conn, _reg(SECRET_A), b"k")  # the next registration binds it
    _conflict(lambda: nodes.register(conn, _reg(SECRET_B), b"k"))
    conn.close()


def _approved_ids(conn) -> list[str]:
    """The nodes the fleet view would hold (it leaves pending ones out)."""
    view = FleetView()
    view.load(nodes.load_states(conn), [])
    return sorted(node.node_id for node in view.online_nodes())


def test_a_new_node_is_pending_until_approved_and_keeps_its_approval(conn):
    enrolled = nodes.enroll(conn, _reg(SECRET_A), b"k")
    assert not enrolled.approved and enrolled.approval == "pending"
    assert nodes.list_nodes(conn, 60)[0]["approval"] == "pending"
    assert _approved_ids(conn) == []
    beat = nodes.Heartbeat.parse({"node_secret": SECRET_A})
    assert nodes.record_heartbeat(conn, "n", beat) is False
    version = db.versions(conn)["fleet"]
    assert nodes.approve(conn, "n") and nodes.approve(conn, "n")  # idempotent
    assert db.versions(conn)["fleet"] == version + 1
    assert not nodes.approve(conn, "ghost") and not nodes.revoke(conn, "ghost")
    (listed,) = nodes.list_nodes(conn, 60)
    assert listed["approval"] == "approved" and listed["approved_at"]
    assert _approved_ids(conn) == ["n"]
    # The same credential registering again (a restart, a new URL) keeps the approval.
    assert nodes.enroll(conn, _reg(SECRET_A, "http://moved"), b"other").approved
    assert nodes.record_heartbeat(conn, "n", beat)
    # Revoked: pending again at once; removed: a new registration starts pending.
    assert nodes.revoke(conn, "n") and _approved_ids(conn) == []
    assert nodes.approve(conn, "n")
    assert nodes.unregister(conn, "n", None, force=True)
    assert not nodes.enroll(conn, _reg(SECRET_A), b"k").approved


def test_auto_approval_approves_at_registration_and_heartbeat(conn):
    assert nodes.enroll(conn, _reg(SECRET_A), b"k", auto_approve=True).approved
    assert _approved_ids(conn) == ["n"]
    assert nodes.revoke(conn, "n")
    beat = nodes.Heartbeat.parse({"node_secret": SECRET_A})
    assert nodes.record_heartbeat(conn, "n", beat) is False
    assert nodes.record_heartbeat(conn, "n", beat, auto_approve=True) is True
    assert _approved_ids(conn) == ["n"]
    assert nodes.record_heartbeat(conn, "ghost", beat, auto_approve=True) is None


def _report(peer: str, reporter: str | None, secret: str | None = None) -> PeerReport:
    return PeerReport("m", peer, "sha256 mismatch", reporter, secret)


def test_only_approved_reporters_proving_their_id_count(conn):
    secrets_ = {"a": SECRET_A, "b": SECRET_B, "p": "secret-p-0123456789abcdef"}
    for node_id, secret in secrets_.items():
        body = {"node_id": node_id, "url": f"http://{node_id}", "node_secret": secret}
        nodes.enroll(conn, nodes.Registration.parse(body), b"k", auto_approve=node_id != "p")
    assert not nodes.record_peer_report(conn, _report("a", None))  # names no reporter
    assert not nodes.record_peer_report(conn, _report("a", "ghost", SECRET_A))  # unknown
    assert not nodes.record_peer_report(conn, _report("a", "p", secrets_["p"]))  # pending
    assert not nodes.record_peer_report(conn, _report("a", "a", SECRET_A))  # itself
    _conflict(lambda: nodes.record_peer_report(conn, _report("p", "a", SECRET_B)))
    _conflict(lambda: nodes.record_peer_report(conn, _report("p", "a"), b"k"))
    assert nodes.peer_reports(conn, "m") == []
    assert nodes.record_peer_report(conn, _report("p", "a", SECRET_A))
    assert nodes.record_peer_report(conn, _report("p", "a", SECRET_A))  # once per reporter
    assert nodes.record_peer_report(conn, _report("a", "b", SECRET_B))
    assert sorted(nodes.peer_reports(conn, "m")) == [("a", "b"), ("p", "a")]
    # A revoked reporter's reports weigh nothing; a removed node's go with it.
    assert nodes.revoke(conn, "b")
    assert nodes.peer_reports(conn, "m") == [("p", "a")]
    assert nodes.unregister(conn, "a", None, force=True)  # reported and reporter
    assert conn.execute("SELECT COUNT(*) FROM peer_reports").fetchone()[0] == 0


def test_nodes_known_before_enrollment_stay_approved(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for migration in db.MIGRATIONS[:3]:
        for statement in migration:
            old.execute(db.statement_for(statement, db.SQLITE))
    old.execute(
        "INSERT INTO nodes (id, url, runtimes, gpu, slots, sync_token, status, models, "
        "registered_at, last_seen, credential_hash) VALUES ('n', 'http://n', '[]', '{}', 1, "
        "'t', 'online', '[]', '2025-01-01T00:00:00.000Z', 0, 'h')"
    )
    old.execute("PRAGMA user_version = 3")
    old.commit()
    old.close()
    conn = db.open_database(path)
    assert nodes.list_nodes(conn, 60)[0]["approval"] == "approved"
    conn.close()
