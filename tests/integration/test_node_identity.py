"""A node id belongs to the node that registered it: no other credential takes it over.

Real router and node processes: the node's secret lives next to ``.node-id`` in its store;
another registration of the id is 409 ``node_id_conflict`` until an admin removes the node,
and a node whose registration changed or vanished registers again.
"""

from __future__ import annotations

import stat

from tests.node_fixtures import create_key, start_node
from tests.procs import wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-node-identity"
EVIL_URL = "http://127.0.0.1:9"
EVIL_SECRET = "evil-secret-0123456789abcdef"


def _node_row(router: str, node_id: str) -> dict | None:
    listed = call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]
    return next((n for n in listed if n["node_id"] == node_id), None)


def _takeover(node_id: str, secret: str | None = None) -> dict:
    body = {"node_id": node_id, "url": EVIL_URL, "models": [{"id": "acme/m", "state": "ready"}]}
    if secret is not None:
        body["node_secret"] = secret
    return body


def test_a_live_node_id_cannot_be_taken_over(spawn, tmp_path):
    env = {"LLMLB_HEARTBEAT_INTERVAL_S": "0.2"}
    router = start_router(spawn, tmp_path / "home", ADMIN, env=env)
    node_key = create_key(router, ADMIN, "node")
    store = tmp_path / "store"
    node = start_node(spawn, router, node_key, store)
    node_id = call(node, "GET", "/ready").json["node_id"]
    wait_until(lambda: _node_row(router, node_id), timeout=20, message="node registered")

    secret_file = store / ".node-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert node_id in secret_file.read_text()

    # Any other node-scope credential: the same key the node uses, another key, a guessed secret.
    other_key = create_key(router, ADMIN, "node")
    for key, secret in [(node_key, None), (other_key, None), (other_key, EVIL_SECRET)]:
        reply = call(router, "POST", "/v0/nodes", key, _takeover(node_id, secret))
        assert reply.status == 409, reply.body
        assert reply.json["error"]["code"] == "node_id_conflict"
        beat = {"models": [{"id": "acme/m", "state": "ready"}]}
        if secret:
            beat["node_secret"] = secret
        reply = call(router, "POST", f"/v0/nodes/{node_id}/heartbeat", key, beat)
        assert reply.status == 409 and reply.json["error"]["code"] == "node_id_conflict"
    # A node key cannot remove another node's registration either.
    reply = call(router, "DELETE", f"/v0/nodes/{node_id}", other_key)
    assert reply.status == 409 and reply.json["error"]["code"] == "node_id_conflict"
    row = _node_row(router, node_id)
    assert row["url"] == node and row["status"] == "online"
    assert all(m["id"] != "acme/m" for m in row["models"])

    # An admin removes the node and someone else registers the id before the node is back
    # (retried until the other registration wins the race against the node's heartbeat).
    def taken() -> bool:
        call(router, "DELETE", f"/v0/nodes/{node_id}", ADMIN)
        reply = call(router, "POST", "/v0/nodes", other_key, _takeover(node_id, EVIL_SECRET))
        return reply.status == 201

    wait_until(taken, timeout=20, message="the id registered by another node")
    # The real node's heartbeats now get 409; it tries to register again and is refused.
    wait_until(
        lambda: "has another registration for this node" in node.proc.log(),
        timeout=20,
        message="node told its registration changed",
    )
    wait_until(
        lambda: call(node, "GET", "/ready").json["registered"] is False,
        timeout=20,
        message="node no longer registered",
    )
    assert _node_row(router, node_id)["url"] == EVIL_URL

    # Once an admin removes the impostor, the node's next heartbeat (404) re-registers it.
    assert call(router, "DELETE", f"/v0/nodes/{node_id}", ADMIN).status == 204
    wait_until(
        lambda: (_node_row(router, node_id) or {}).get("url") == node,
        timeout=20,
        message="node registered again at its own URL",
    )
    assert call(node, "GET", "/ready").json["registered"] is True
