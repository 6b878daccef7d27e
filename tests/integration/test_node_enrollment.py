"""Node enrollment with real processes: on a router with manual approval (``llmlb router``'s
default) a node key alone cannot make the router send a node client traffic, the peer token,
sync notifications or a place in any peer list; an admin approves (API, CLI), the approval
survives a router restart and the node's re-registration; peer reports are weighed, so one
stolen node credential cannot evict a node from every peer list."""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, place_model, start_node
from tests.procs import LLMLB, wait_until
from tests.router_fixtures import Reply, RouterUrl, call, start_router

ADMIN = "sk-admin-enrollment-0123456789"
MODEL = "local/gemma"
FAKE_TEXT = "PWNED-BY-A-FAKE-NODE"
ROUTER_ENV = {"LLMLB_HEARTBEAT_INTERVAL_S": "0.5"}
MANUAL = ("--node-approval", "manual")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_args(request) -> tuple[str, ...]:
    """The router's database flags: its SQLite ``lb.db``, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return ()
    return ("--db", request.getfixturevalue("postgres_url"))


class FakeNode:
    """What an attacker holding a node key runs: it registers a node of its own claiming
    ``models`` (id -> revision) ready, heartbeats, answers every POST (inference, sync
    notifications) with a canned completion and records it. Use as a context manager.

    Args:
        router: the router's base URL.
        node_key: a node-scope key.
        models: model id -> the revision it claims to hold (``None``: placed by hand).
    """

    def __init__(self, router: str, node_key: str, models: dict[str, str | None]):
        self.router, self.node_key, self.models = router, node_key, models
        self.node_id = "fake-" + secrets.token_hex(4)
        self.secret = secrets.token_urlsafe(24)
        self.posts: list[tuple[str, bytes]] = []
        self.registration: dict[str, Any] = {}
        self.beats: list[dict[str, Any]] = []  # every heartbeat answer, oldest first
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._answer({"status": "ok"})

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fake.posts.append((self.path, body))
                self._answer(
                    {
                        "id": "cmpl-fake",
                        "object": "text_completion",
                        "created": 0,
                        "model": MODEL,
                        "choices": [
                            {"index": 0, "text": FAKE_TEXT, "finish_reason": "length"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                )

            def _answer(self, data: dict) -> None:
                payload = orjson.dumps(data)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    @property
    def inference(self) -> list[bytes]:
        """Bodies of the client requests the router sent here."""
        return [body for path, body in self.posts if path.startswith("/v1/")]

    @property
    def syncs(self) -> list[bytes]:
        """Bodies of the sync notifications the router sent here."""
        return [body for path, body in self.posts if path == "/api/models/sync"]

    def _reports(self) -> list[dict]:
        return [
            {"id": m, "state": "ready", **({"revision": r} if r else {})}
            for m, r in self.models.items()
        ]

    def register(self) -> dict[str, Any]:
        """Register (again); returns the router's answer."""
        body = {
            "node_id": self.node_id,
            "url": self.url,
            "runtimes": ["llama.cpp"],
            "slots": 4,
            "models": self._reports(),
            "node_secret": self.secret,
        }
        reply = call(self.router, "POST", "/v0/nodes", self.node_key, body)
        assert reply.status == 201, reply.body
        self.registration = reply.json
        return reply.json

    def report(self, peer: str, model: str, secret: str | None = None) -> Reply:
        """Report ``peer`` for serving bad bytes of ``model``, as this node (with ``secret``,
        another secret than its own)."""
        body = {
            "model_id": model,
            "node_id": peer,
            "reason": "sha256 mismatch",
            "reporter": self.node_id,
            "node_secret": secret or self.secret,
        }
        return call(self.router, "POST", "/v0/peers/report", self.node_key, body)

    def __enter__(self) -> FakeNode:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.register()
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def _beat(self) -> None:
        body = {"models": self._reports(), "node_secret": self.secret}
        path = f"/v0/nodes/{self.node_id}/heartbeat"
        while not self._stop.wait(0.2):
            try:
                reply = call(self.router, "POST", path, self.node_key, body, timeout=5)
            except OSError:  # the router restarting
                continue
            if reply.status == 200:
                self.beats.append(reply.json)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


def llmlb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LLMLB, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


def _nodes(router: str) -> dict[str, dict]:
    return {n["node_id"]: n for n in call(router, "GET", "/v0/nodes", ADMIN).json["nodes"]}


def _approve(router: str, node_id: str) -> None:
    reply = call(router, "POST", f"/v0/nodes/{node_id}/approve", ADMIN)
    assert reply.status == 200 and reply.json == {"node_id": node_id, "approval": "approved"}


def _beat_since(fake: FakeNode, count: int) -> dict | None:
    """The latest heartbeat answer, once there are more than ``count``."""
    return fake.beats[-1] if len(fake.beats) > count else None


def _restart(spawn, router: RouterUrl, db_args: tuple[str, ...]) -> None:
    """Stop the router and start it again on the same port, home and database (manual
    approval)."""
    router.proc.stop()
    port = router.rsplit(":", 1)[1]
    argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", port, *MANUAL, *db_args]
    env = {"LLMLB_HOME": str(router.home), "LLMLB_ADMIN_KEY": ADMIN, **ROUTER_ENV}
    router.proc = spawn(argv, env=env, name="router")
    router.proc.wait_http(f"{router}/health", timeout=60)


def test_a_node_key_gets_no_client_traffic_until_an_admin_approves(
    spawn, tmp_path, gemma_gguf, db_args
):
    router = start_router(spawn, tmp_path / "home", ADMIN, *MANUAL, *db_args, env=ROUTER_ENV)
    node_key = create_key(router, ADMIN, "node")
    api_key = create_key(router, ADMIN, "api")
    store = tmp_path / "store"
    place_model(store, MODEL, gemma_gguf)
    node = start_node(spawn, router, node_key, store)
    node_id = call(node, "GET", "/ready").json["node_id"]

    # A real node waits for approval too: listed pending, its model served by nobody.
    assert _nodes(router)[node_id]["approval"] == "pending"
    wait_until(lambda: "waits for an admin to approve" in node.proc.log(), message="node log")
    body = {"model": MODEL, "prompt": "Paris is the capital of", "max_tokens": 2}
    reply = call(router, "POST", "/v1/completions", api_key, body)
    assert reply.status == 404 and reply.json["error"]["code"] == "model_not_found", reply.body

    # Only an admin approves.
    for key, status in ((None, 401), (api_key, 403), (node_key, 403)):
        reply = call(router, "POST", f"/v0/nodes/{node_id}/approve", key)
        assert reply.status == status and reply.json["error"]["message"], reply.body
    reply = call(router, "POST", "/v0/nodes/no-such-node/approve", ADMIN)
    assert reply.status == 404 and reply.json["error"]["code"] == "node_not_found"
    assert _nodes(router)[node_id]["approval"] == "pending"
    done = llmlb("nodes", "approve", "no-such-node", "--router", router, "--api-key", ADMIN)
    assert done.returncode == 1 and "node_not_found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = llmlb("nodes", "approve", node_id, "--router", router, "--api-key", ADMIN)
    assert done.returncode == 0 and done.stdout == f"node {node_id}: approved\n", done.stderr
    def model_ready() -> bool:
        return call(router, "GET", f"/v1/models/{MODEL}", api_key).json.get("ready")

    wait_until(model_ready, message="the model ready on the router")
    wait_until(lambda: "approved by the router" in node.proc.log(), message="node log")

    with FakeNode(router, node_key, {MODEL: None}) as fake:
        # A fresh node key's node: pending, no peer token, no client request in 20.
        assert fake.registration["approval"] == "pending"
        assert "peer_token" not in fake.registration
        wait_until(lambda: _beat_since(fake, 0), message="a heartbeat")
        assert fake.beats[-1]["approval"] == "pending" and "peer_token" not in fake.beats[-1]
        for i in range(20):
            body = {"model": MODEL, "prompt": f"Fact {i}: Paris is the capital of", "max_tokens": 2}
            reply = call(router, "POST", "/v1/completions", api_key, body, timeout=120)
            assert reply.status == 200, reply.body
            assert reply.json["choices"][0]["text"] != FAKE_TEXT
        assert fake.inference == []

        # Approved (idempotent): the peer token with its next heartbeat, and client traffic.
        _approve(router, fake.node_id)
        _approve(router, fake.node_id)
        beats = len(fake.beats)
        answer = wait_until(lambda: _beat_since(fake, beats), message="a heartbeat")
        assert answer["approval"] == "approved" and answer["peer_token"].startswith("fleet-")

        def fake_served() -> bool:
            body = {"model": MODEL, "prompt": "Rome is the capital of", "max_tokens": 2}
            assert call(router, "POST", "/v1/completions", api_key, body, timeout=120).status == 200
            return bool(fake.inference)

        wait_until(fake_served, timeout=60, interval=0, message="a request on the fake node")
        listed = llmlb("nodes", "ls", "--json", "--router", router, "--api-key", ADMIN)
        assert listed.returncode == 0, listed.stderr
        states = {n["node_id"]: n["approval"] for n in orjson.loads(listed.stdout)}
        assert states == {node_id: "approved", fake.node_id: "approved"}
        table = llmlb("nodes", "ls", "--router", router, "--api-key", ADMIN).stdout
        assert "APPROVAL" in table and "approved" in table

        # The approval is in the database: it survives a restart and a re-registration.
        _restart(spawn, router, db_args)
        wait_until(model_ready, message="the model ready after the restart")
        beats = len(fake.beats)
        answer = wait_until(lambda: _beat_since(fake, beats), message="a heartbeat")
        assert answer["approval"] == "approved" and "peer_token" in answer
        assert fake.register()["approval"] == "approved"
        assert "peer_token" in fake.registration
        with FakeNode(router, node_key, {MODEL: None}) as newcomer:
            assert newcomer.registration["approval"] == "pending"
            listed = _nodes(router)
            assert listed[newcomer.node_id]["approval"] == "pending"
            assert listed[fake.node_id]["approval"] == listed[node_id]["approval"] == "approved"
            fake.posts.clear()
            wait_until(fake_served, timeout=60, interval=0, message="traffic after the restart")
            assert newcomer.inference == []

        # Revoked: pending again, out of rotation at once.
        reply = call(router, "POST", f"/v0/nodes/{fake.node_id}/revoke", ADMIN)
        assert reply.status == 200 and reply.json["approval"] == "pending"
        fake.posts.clear()
        for i in range(5):
            body = {"model": MODEL, "prompt": f"Again {i}: Paris is", "max_tokens": 2}
            assert call(router, "POST", "/v1/completions", api_key, body, timeout=120).status == 200
        assert fake.inference == []


def _peers_for(router: str, model: str, node_id: str) -> tuple[set[str], Any]:
    """The peers (and wait) a manifest lists for ``node_id``."""
    path = f"/v0/models/registry/{model}/manifest.json?node_id={node_id}"
    reply = call(router, "GET", path, ADMIN)
    assert reply.status == 200, reply.body
    return {p["node_id"] for p in reply.json["peers"]}, reply.json["peer_wait_s"]


def test_a_stolen_node_credential_cannot_evict_a_peer_from_every_list(spawn, tmp_path, db_args):
    root = tmp_path / "hub"
    for repo in ("org/m", "org/n"):
        make_repo(root, repo, {"m-Q4_K_M.gguf": b"GGUF" + bytes(60)})
    hub = start_hub(spawn, root)
    env = {"HF_ENDPOINT": hub, "LLMLB_PEER_WAIT_S": "0", **ROUTER_ENV}
    router = start_router(spawn, tmp_path / "home", ADMIN, *MANUAL, *db_args, env=env)
    node_key = create_key(router, ADMIN, "node")
    reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "org/m"})
    assert reply.status == 201, reply.body
    models = {"org/m": reply.json["revision"]}
    with (
        FakeNode(router, node_key, models) as a,
        FakeNode(router, node_key, models) as b,
        FakeNode(router, node_key, models) as c,
        FakeNode(router, node_key, models) as victim,
        FakeNode(router, node_key, models) as mallory,
    ):
        fleet = (a, b, c, victim)
        for fake in fleet:
            _approve(router, fake.node_id)
        assert _nodes(router)[mallory.node_id]["approval"] == "pending"
        # The pending node: no peer token, in nobody's list, and given no peers itself.
        assert "peer_token" not in mallory.registration
        for fake in fleet:
            expected = {f.node_id for f in fleet} - {fake.node_id}
            assert _peers_for(router, "org/m", fake.node_id) == (expected, None)
        assert _peers_for(router, "org/m", mallory.node_id) == (set(), None)

        # Its reports count for nothing, nor does one naming no reporter or another node
        # without that node's secret.
        reply = mallory.report(victim.node_id, "org/m")
        assert reply.status == 202 and reply.json["counted"] is False
        anonymous = {"model_id": "org/m", "node_id": victim.node_id, "reason": "bad"}
        reply = call(router, "POST", "/v0/peers/report", node_key, anonymous)
        assert reply.status == 202 and reply.json["counted"] is False
        reply = call(
            router, "POST", "/v0/peers/report", node_key, {**anonymous, "reporter": a.node_id}
        )
        assert reply.status == 409 and reply.json["error"]["code"] == "node_id_conflict"
        reply = a.report(victim.node_id, "org/m", secret=mallory.secret)
        assert reply.status == 409 and reply.json["error"]["code"] == "node_id_conflict"
        assert victim.node_id in _peers_for(router, "org/m", b.node_id)[0]

        # A stolen approved credential (a's secret and the node key): the victim leaves a's
        # own list, no one else's.
        reply = a.report(victim.node_id, "org/m")
        assert reply.status == 202 and reply.json["counted"] is True
        assert victim.node_id not in _peers_for(router, "org/m", a.node_id)[0]
        for asker in (b.node_id, c.node_id, "not-a-node"):
            assert victim.node_id in _peers_for(router, "org/m", asker)[0]
        # A second approved node's report takes it off every list.
        assert b.report(victim.node_id, "org/m").json["counted"] is True
        for asker in (c.node_id, "not-a-node"):
            assert victim.node_id not in _peers_for(router, "org/m", asker)[0]

        # Sync notifications go to approved nodes only.
        reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "org/n"})
        assert reply.status == 201, reply.body
        wait_until(lambda: all(f.syncs for f in fleet), message="every approved node notified")
        assert b"org/n" in a.syncs[-1]
        assert mallory.syncs == []
