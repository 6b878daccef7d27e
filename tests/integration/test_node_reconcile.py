"""Missed sync notifications are reconciled; hand-placed models are reported; ``--require-key``."""

from __future__ import annotations

from tests.factories import gguf_bytes
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, model_status, start_node
from tests.procs import LLMLB, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-node-reconcile"
TINY = gguf_bytes()
HAND = "local/hand"
# Long heartbeats: after a router restart the node stays offline for the router (so it sends
# no notifications) until its next heartbeat; only the node's own reconcile can catch up.
ROUTER_ENV = {"LLMLB_HEARTBEAT_INTERVAL_S": "30"}


def _state(node, model):
    return (model_status(node, model) or {}).get("state")


def test_missed_notifications_are_reconciled_and_hand_placed_models_kept(spawn, tmp_path):
    root = tmp_path / "hub"
    for repo in ("org/one", "org/two", "org/three"):
        make_repo(root, repo, {"model.gguf": TINY})
    hub = start_hub(spawn, root)
    env = {"HF_ENDPOINT": hub, **ROUTER_ENV}
    home = tmp_path / "home"
    router = start_router(spawn, home, ADMIN, env=env)
    store = tmp_path / "store"
    (store / HAND).mkdir(parents=True)
    (store / HAND / "model.gguf").write_bytes(TINY)
    key = create_key(router, ADMIN, "node")
    node_env = {"HF_ENDPOINT": hub}
    node = start_node(spawn, router, key, store, "--reconcile-interval", "0.5", env=node_env)
    assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": "org/one"}).status == 201
    wait_until(lambda: _state(node, "org/one") == "ready", timeout=30, message="org/one")

    # Hand-placed models reach the router with their format and size.
    listed = {m["id"]: m for m in call(router, "GET", "/v1/models", ADMIN).json["data"]}
    assert listed[HAND]["format"] == "gguf" and listed[HAND]["size_bytes"] == len(TINY)

    # 1. The node is down while a model is deleted and another registered.
    node.proc.stop()
    assert call(router, "DELETE", "/v1/models/org/one", ADMIN).status == 204
    assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": "org/two"}).status == 201
    node = start_node(
        spawn, router, key, store, "--reconcile-interval", "0.5", env=node_env, port=node.port
    )
    # Reconciled before /ready: the stale download is gone, the new model is on its way.
    assert not (store / "org" / "one").exists()
    assert _state(node, "org/one") is None
    wait_until(lambda: _state(node, "org/two") == "ready", timeout=30, message="org/two")

    # 2. The router restarts; while it counts the node offline, models change.
    router.proc.stop()
    port = router.rsplit(":", 1)[1]
    argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", port]
    restarted = spawn(
        argv, env={"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": ADMIN, **env}, name="router"
    )
    restarted.wait_http(f"{router}/health", timeout=60)
    assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": "org/three"}).status == 201
    assert call(router, "DELETE", "/v1/models/org/two", ADMIN).status == 204
    wait_until(
        lambda: _state(node, "org/three") == "ready" and _state(node, "org/two") is None,
        timeout=30,
        message="reconciled after the router restart",
    )
    assert not (store / "org" / "two").exists()
    assert (store / HAND / "model.gguf").exists() and _state(node, HAND) == "ready"


def test_require_key_guards_the_openai_routes(spawn, tmp_path):
    store = tmp_path / "store"
    (store / HAND).mkdir(parents=True)
    (store / HAND / "model.gguf").write_bytes(TINY)
    node = start_node(spawn, "", None, store, env={"LLMLB_NODE_REQUIRE_KEY": "sk-node-secret"})
    for key in (None, "wrong"):
        reply = call(node, "GET", "/v1/models", key)
        assert reply.status == 401 and reply.json["error"]["code"] == "invalid_api_key"
        reply = call(node, "POST", "/v1/completions", key, {"model": HAND, "prompt": "x"})
        assert reply.status == 401
    reply = call(node, "GET", "/v1/models", "sk-node-secret")
    assert reply.status == 200 and [m["id"] for m in reply.json["data"]] == [HAND]
    reply = call(node, "POST", "/v1/completions", "sk-node-secret", {"model": "no/such"})
    assert reply.status == 404  # past the key check
    assert call(node, "GET", "/health").status == 200  # not under /v1
    assert call(node, "GET", "/api/models/status").status == 200
