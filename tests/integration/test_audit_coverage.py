"""Every admin action reaches the audit log, with the acting key's id and the target, and no
secret: a real router (SQLite, then PostgreSQL) and the hub stand-in behind a hub token.

The actions are :data:`llmlb.router.api.routes.keys.AUDITED`; the router has no route that
changes its settings (they are fixed at start), so none is audited.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest
from llmlb.router.api.routes.keys import AUDITED

from tests.hub_fixtures import make_repo, start_hub
from tests.procs import LLMLB
from tests.router_fixtures import call, free_url, start_router

ADMIN = "sk-admin-audit-coverage-0123456789"
GGUF = b"GGUF" + b"\x03\x00\x00\x00" + bytes(4096)
MODEL = "audit/model"


def _created(router: str, key: str, body: dict) -> tuple[str, str]:
    reply = call(router, "POST", "/v0/keys", key, body)
    assert reply.status == 201, reply.body
    return reply.json["id"], reply.json["key"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_admin_action_is_audited_with_actor_and_target_and_no_secret(
    request, spawn, tmp_path, backend
):
    hub_token = "hf_audit_" + secrets.token_hex(12)
    node_secret = "ns-audit-" + secrets.token_hex(12)
    root = tmp_path / "hub"
    make_repo(root, "acme/audited", {"audited-Q4_K_M.gguf": GGUF})
    hub = start_hub(spawn, root, "--require-token", hub_token)
    home = tmp_path / "home"
    home.mkdir()
    args: tuple[str, ...] = ("--node-approval", "manual")
    if backend == "postgresql":
        args += ("--db", request.getfixturevalue("postgres_url"))
    env = {"HF_ENDPOINT": hub, "HF_TOKEN": hub_token}
    router = start_router(spawn, home, ADMIN, *args, env=env)

    operator_id, operator = _created(router, ADMIN, {"scope": "admin", "name": "operator"})
    node_key_id, node_key = _created(router, operator, {"scope": "node", "name": "node"})
    changed = call(router, "PATCH", f"/v0/keys/{node_key_id}", operator, {"name": "node-1"})
    assert changed.status == 200, changed.body

    # A register body carrying credentials the route does not take: none may be recorded.
    register = {
        "repo": "acme/audited",
        "id": MODEL,
        "hf_token": hub_token,
        "Authorization": f"Bearer {ADMIN}",
        "node_secret": node_secret,
        "x-api-key": node_key,
        "api_key": operator,
        "options": {"access_token": hub_token, "password": "pw-" + hub_token},
    }
    registered = call(router, "POST", "/v1/models/register", operator, register)
    assert registered.status == 201, registered.body
    assert call(router, "POST", f"/v0/models/{MODEL}/retry", operator).status == 202

    # Enrollment (node scope, not an admin action) with a node secret, then the admin's steps.
    enrolled = call(
        router,
        "POST",
        "/v0/nodes",
        node_key,
        {"node_id": "audit-node", "url": free_url(), "slots": 1, "models": [],
         "node_secret": node_secret},
    )  # fmt: skip
    assert enrolled.status == 201, enrolled.body
    sync_token = enrolled.json["sync_token"]
    assert call(router, "POST", "/v0/nodes/audit-node/approve", operator).status == 200
    assert call(router, "POST", "/v0/nodes/audit-node/revoke", operator).status == 200
    assert call(router, "DELETE", "/v0/nodes/audit-node", operator).status == 204
    # A node key removes the node bound to it: the node key is the actor.
    own = {"node_id": "audit-node-2", "url": free_url(), "slots": 1, "models": []}
    assert call(router, "POST", "/v0/nodes", node_key, own).status == 201
    assert call(router, "DELETE", "/v0/nodes/audit-node-2", node_key).status == 204
    # Refused and failed actions append nothing.
    assert call(router, "POST", "/v0/nodes/nobody/approve", operator).status == 404
    assert call(router, "DELETE", f"/v1/models/{MODEL}x", operator).status == 404
    assert call(router, "POST", "/v0/nodes/audit-node-2/approve", node_key).status == 403
    assert call(router, "DELETE", f"/v1/models/{MODEL}", operator).status == 204
    # An admin key that revokes itself is still the actor of its revocation.
    assert call(router, "DELETE", f"/v0/keys/{operator_id}", operator).status == 204

    log = call(router, "GET", "/v0/audit", ADMIN)
    assert log.status == 200, log.body
    entries = log.json["entries"]
    recorded = [(e["action"], e["actor"], e["target"]) for e in entries]
    assert recorded == [
        ("key.created", "key_admin_env", operator_id),
        ("key.created", operator_id, node_key_id),
        ("key.changed", operator_id, node_key_id),
        ("model.registered", operator_id, MODEL),
        ("model.retried", operator_id, MODEL),
        ("node.approved", operator_id, "audit-node"),
        ("node.revoked", operator_id, "audit-node"),
        ("node.removed", operator_id, "audit-node"),
        ("node.removed", node_key_id, "audit-node-2"),
        ("model.deleted", operator_id, MODEL),
        ("key.revoked", operator_id, operator_id),
    ]
    assert log.json["count"] == len(entries)
    assert {action for action, _, _ in recorded} == set(AUDITED.values())
    assert entries[0]["change"] == {"scope": "admin", "name": "operator"}
    secret_fields = "hf_token Authorization node_secret x-api-key api_key access_token password"
    assert entries[3]["change"] == {
        "repo": "acme/audited",
        "id": MODEL,
        **{name: "[redacted]" for name in secret_fields.split()[:5]},
        "options": {"access_token": "[redacted]", "password": "[redacted]"},
    }
    for secret in (ADMIN, operator, node_key, node_secret, hub_token, sync_token, "Bearer"):
        assert secret.encode() not in log.body, secret
    verified = subprocess.run(
        [*LLMLB, "audit", "verify", "--router", router, "--api-key", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"ok: {len(entries)} entries" in verified.stdout
