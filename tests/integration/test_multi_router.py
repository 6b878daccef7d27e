"""Several routers on one PostgreSQL: shared registrations, keys and nodes; caches that follow
each other within a second; background duties done once, by one leader, moving on when it
dies; nodes failing over between routers; a database outage that inference does not notice.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE
from llmlb.router import db

from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, place_model, start_node
from tests.procs import LLMLB, free_port, wait_until
from tests.router_fixtures import NodeStandin, RouterUrl, call

ADMIN = "sk-test-admin-multi-router"
GGUF = b"GGUF" + bytes(1024)
REPO = "google/gemma-3-270m-it-gguf"
MODEL = "google/gemma-3-270m-it-gguf"
HEARTBEAT_S = 0.4
NOTIFIED_S = 4.0  # a change reaches the other router (its full reload: every 5 s)
ROUTER_ENV = {
    "LLMLB_NODE_APPROVAL": "auto",
    "LLMLB_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
    "LLMLB_SYNC_BACKOFF_BASE_S": "0.1",
    "LLMLB_SYNC_BACKOFF_MAX_S": "0.2",
    "LLMLB_PROXY_COOLDOWN_S": "1",
}


def start_routers(spawn, tmp_path, url: str, count: int, env: dict[str, str]) -> list[RouterUrl]:
    """Start ``count`` routers on database ``url`` at once (each its own home); wait for all."""
    routers = []
    for index in range(count):
        port = free_port()
        home = tmp_path / f"home{index}"
        argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", str(port), "--db", url]
        full_env = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": ADMIN, **ROUTER_ENV, **env}
        router = RouterUrl(f"http://127.0.0.1:{port}")
        router.proc = spawn(argv, env=full_env, name=f"router{index}")
        router.home = home
        routers.append(router)
    for router in routers:
        router.proc.wait_http(f"{router}/health", timeout=60)
    return routers


def metric(router: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (``name`` with labels, e.g. ``x{result="ok"}``)."""
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{") and name.endswith("}")
    )


def leader_of(routers: list[RouterUrl]) -> RouterUrl:
    """The router whose ``llmlb_router_leader`` gauge is 1 (waits for one)."""
    found: list[RouterUrl] = []

    def one() -> bool:
        found[:] = [r for r in routers if r.proc.alive() and metric(r, "llmlb_router_leader") == 1]
        return len(found) == 1

    wait_until(one, timeout=15, message="one leader")
    return found[0]


def outbox_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT COUNT(*) FROM sync_outbox").fetchone()[0]


def node_entry(router: str, node_id: str) -> dict | None:
    for entry in call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]:
        if entry["node_id"] == node_id:
            return entry
    return None


def chat(router: str, key: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return call(router, "POST", "/v1/chat/completions", key, body, timeout=60).status


@pytest.fixture
def hub(spawn, tmp_path) -> str:
    root = tmp_path / "hub"
    for name in ("first", "second"):
        make_repo(root, f"acme/{name}", {f"{name}.gguf": GGUF})
    return start_hub(spawn, root)


def test_two_routers_share_keys_nodes_and_models_and_notify_once(
    spawn, tmp_path, postgres_url, hub
):
    a, b = start_routers(spawn, tmp_path, postgres_url, 2, {"HF_ENDPOINT": hub})
    # Started together on an empty database: the migrations ran once.
    with psycopg.connect(postgres_url) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM llmlb_migrations")]
    assert sorted(versions) == list(range(1, len(db.MIGRATIONS) + 1))
    logs = a.proc.log() + b.proc.log()
    assert logs.count(f"migrated to schema version {len(db.MIGRATIONS)}") == 1

    # A key created on B works on A; revoked on A, B refuses it. Both through the change
    # notification: the bound is below the 5 s full reload that would also bring them, and
    # far above the notification's latency (milliseconds) on a busy machine.
    created = call(b, "POST", "/v0/keys", ADMIN, {"scope": "api"})
    assert created.status == 201
    key = created.json["key"]
    wait_until(lambda: call(a, "GET", "/v1/models", key).status == 200, timeout=NOTIFIED_S)
    assert call(a, "DELETE", f"/v0/keys/{created.json['id']}", ADMIN).status == 204
    wait_until(lambda: call(b, "GET", "/v1/models", key).status == 401, timeout=NOTIFIED_S)

    leader = leader_of([a, b])
    other = b if leader is a else a
    with NodeStandin() as node:
        # A node registered through one router is known to the other.
        reply = call(other, "POST", "/v0/nodes", ADMIN, {"node_id": "n1", "url": node.url})
        assert reply.status == 201
        wait_until(lambda: node_entry(leader, "n1") is not None, timeout=NOTIFIED_S)
        # Registered through either router (first the one that does not lead): the leader
        # notifies, once.
        for index, repo in enumerate(("acme/first", "acme/second"), start=1):
            client = (leader, other)[index % 2]
            assert call(client, "POST", "/v1/models/register", ADMIN, {"repo": repo}).status == 201
            wait_until(lambda n=index: len(node.arrivals) >= n, timeout=5, message="notified")
        wait_until(lambda: outbox_rows(postgres_url) == 0, timeout=5, message="outbox drained")
        assert [a_.status for a_ in node.arrivals] == [200, 200]
        assert [a_.body for a_ in node.arrivals] == [
            b'{"models":["acme/first"],"action":"register"}',
            b'{"models":["acme/second"],"action":"register"}',
        ]
        sent = 'llmlb_router_sync_notifications_total{result="ok"}'
        assert metric(leader, sent) == 2
        assert metric(other, sent) == 0
        # The token both routers present is the one the node got when it registered.
        assert {a_.headers["authorization"] for a_ in node.arrivals} == {
            f"Bearer {reply.json['sync_token']}"
        }


def test_leader_killed_during_traffic(spawn, tmp_path, postgres_url, gemma_gguf):
    root = tmp_path / "hub"
    make_repo(root, REPO, {gemma_gguf.name: gemma_gguf})
    hub = start_hub(spawn, root)
    env = {"HF_ENDPOINT": hub}
    [a] = start_routers(spawn, tmp_path / "a", postgres_url, 1, env)
    assert leader_of([a]) == a  # the first router leads
    [b] = start_routers(spawn, tmp_path / "b", postgres_url, 1, env)
    node_key = create_key(a, ADMIN, "node")
    api_key = create_key(b, ADMIN, "api")
    store = tmp_path / "store"
    place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
    node = start_node(spawn, f"{a},{b}", node_key, store, env={"HF_ENDPOINT": hub})
    # Registered through A, the model is served through B by the node registered with A.
    body = {"repo": REPO, "chat_template": GEMMA_CHAT_TEMPLATE}
    reply = call(a, "POST", "/v1/models/register", ADMIN, body)
    assert reply.status == 201, reply.body
    wait_until(lambda: chat(b, api_key) == 200, timeout=30, message="served through B")
    [entry] = call(b, "GET", "/v0/nodes", ADMIN).json["nodes"]
    node_id = entry["node_id"]
    assert f"registered with {a} as" in node.proc.log()

    with NodeStandin(failures=10**6) as failing:
        # A (the leader) retries a notification to a node that keeps failing...
        assert call(a, "POST", "/v0/nodes", ADMIN, {"node_id": "s1", "url": failing.url}).status
        assert call(a, "POST", f"/v0/models/{MODEL}/retry", ADMIN).status == 202
        wait_until(lambda: len(failing.arrivals) >= 2, timeout=5, message="retries from A")

        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                statuses.append(chat(b, api_key))

        worker = threading.Thread(target=traffic)
        worker.start()
        wait_until(lambda: len(statuses) >= 2, timeout=30, message="traffic through B")
        a.proc.kill()  # SIGKILL
        killed = time.monotonic()
        failing.failures = len(failing.arrivals)  # from now on the stand-in accepts
        try:
            # ...and B takes the duties over: it delivers the pending notification.
            assert leader_of([b]) == b
            wait_until(
                lambda: any(x.status == 200 and x.at > killed for x in failing.arrivals),
                timeout=10,
                message="the retried notification delivered by B",
            )
            wait_until(lambda: outbox_rows(postgres_url) == 0, timeout=5)
            # The node moved its heartbeats to B and stays online there.
            wait_until(lambda: f"switching to router {b}" in node.proc.log(), timeout=10)
            seen = node_entry(b, node_id)["last_seen"]
            wait_until(lambda: node_entry(b, node_id)["last_seen"] != seen, timeout=5)
            assert node_entry(b, node_id)["status"] == "online"
            # B marks silent nodes offline now: the stand-in never heartbeats.
            wait_until(lambda: node_entry(b, "s1")["status"] == "offline", timeout=10)
            count = len(statuses)
            wait_until(lambda: len(statuses) >= count + 3, timeout=30, message="more traffic")
        finally:
            stop.set()
            worker.join()
    assert statuses and set(statuses) == {200}, statuses


def test_database_outage_inference_goes_on_and_writes_are_503(
    spawn, tmp_path, own_postgres, gemma_gguf
):
    url = own_postgres.create_database()
    [router] = start_routers(spawn, tmp_path, url, 1, {})
    node_key = create_key(router, ADMIN, "node")
    api_key = create_key(router, ADMIN, "api")
    store = tmp_path / "store"
    place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
    start_node(spawn, router, node_key, store)
    wait_until(lambda: chat(router, api_key) == 200, timeout=30, message="served")

    own_postgres.stop()
    reply = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api"})
    assert reply.status == 503
    assert reply.json["error"]["code"] == "database_unavailable"
    assert "retry-after" in reply.headers
    # Inference goes on from the caches, for longer than nodes take to count as offline.
    outage_started = time.monotonic()
    while time.monotonic() - outage_started < HEARTBEAT_S * 3 * 2:
        assert chat(router, api_key) == 200
    assert call(router, "GET", "/v1/models", api_key).status == 200

    own_postgres.start()
    wait_until(
        lambda: call(router, "POST", "/v0/keys", ADMIN, {"scope": "api"}).status == 201,
        timeout=20,
        message="writes to succeed again",
    )
    fresh = create_key(router, ADMIN, "api")
    wait_until(lambda: chat(router, fresh) == 200, timeout=5, message="the new key works")
    for _ in range(3):
        assert chat(router, api_key) == 200
