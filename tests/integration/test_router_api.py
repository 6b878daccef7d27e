"""The router's HTTP API against a real Granian process, a real SQLite file and the hub stand-in."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest

from tests.hub_fixtures import make_repo, start_hub
from tests.procs import Proc, wait_until
from tests.router_fixtures import RouterUrl, call, free_url, start_router

ADMIN = "sk-test-admin-key-0123456789"
GGUF = b"GGUF" + b"\x03\x00\x00\x00" + bytes(4096)
SHA40 = re.compile(r"^[0-9a-f]{40}$")


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Like the ``spawn`` fixture, for processes shared by the whole module."""
    logs = tmp_path_factory.mktemp("logs")
    procs: list[Proc] = []

    def _spawn(argv: list[str], env: dict[str, str] | None = None, name: str = "proc") -> Proc:
        proc = Proc(argv, logs / f"{name}-{len(procs)}.log", env=env)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in reversed(procs):
        proc.stop()


@pytest.fixture(scope="module")
def hub(module_spawn, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("hub")
    make_repo(root, "Acme/Tiny-GGUF", {"tiny-Q4_K_M.gguf": GGUF, "README.md": b"# tiny"})
    make_repo(root, "acme/two", {"two-Q4_K_M.gguf": GGUF, "two-Q8_0.gguf": GGUF + b"8"})
    make_repo(root, "acme/nothing", {"README.md": b"# no model here"})
    make_repo(root, "acme/flaky", {"flaky.gguf": GGUF})
    make_repo(root, "acme/other", {"other.gguf": GGUF})
    return start_hub(
        module_spawn, root, "--fault", "status:code=503,route=api,repo=acme/flaky,times=always"
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def router(
    request: pytest.FixtureRequest,
    module_spawn,
    tmp_path_factory: pytest.TempPathFactory,
    hub: str,
) -> RouterUrl:
    """The router under test, on each backend in turn: its own ``lb.db``, then a fresh
    PostgreSQL database (the session's server)."""
    home = tmp_path_factory.mktemp("home")
    env = {"HF_ENDPOINT": hub, "LLMLB_MAX_BODY_BYTES": "65536"}
    args: tuple[str, ...] = ()
    if request.param == "postgresql":
        args = ("--db", request.getfixturevalue("postgres_server").create_database())
    return start_router(module_spawn, home, ADMIN, *args, env=env)


@pytest.fixture(scope="module")
def keys(router: RouterUrl) -> dict[str, str]:
    """One key per scope."""
    made = {"admin": ADMIN}
    for scope in ("api", "node"):
        reply = call(router, "POST", "/v0/keys", ADMIN, {"scope": scope, "name": f"t-{scope}"})
        assert reply.status == 201, reply.json
        made[scope] = reply.json["key"]
    return made


def _error(reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]


# -- auth ----------------------------------------------------------------------------------

# (method, path, body, the scope that the route needs)
SCOPED_ROUTES = [
    ("GET", "/v1/models", None, "api"),
    ("GET", "/v1/models/acme/x", None, "api"),
    ("POST", "/v1/chat/completions", {"model": "acme/x", "messages": []}, "api"),
    ("POST", "/v1/completions", {"model": "acme/x", "prompt": "hi"}, "api"),
    ("POST", "/v1/embeddings", {"model": "acme/x", "input": "hi"}, "api"),
    ("GET", "/v0/models", None, "node"),
    ("GET", "/v0/models/registry/acme/x/manifest.json", None, "node"),
    ("POST", "/v0/nodes", {"url": "http://127.0.0.1:9"}, "node"),
    ("POST", "/v0/nodes/n1/heartbeat", {}, "node"),
    ("DELETE", "/v0/nodes/n1", None, "node"),
    ("GET", "/v0/nodes", None, "admin"),
    ("GET", "/v0/keys", None, "admin"),
    ("POST", "/v0/keys", {"scope": "api"}, "admin"),
    ("DELETE", "/v0/keys/key_nope", None, "admin"),
    ("POST", "/v1/models/register", {"repo": "acme/other"}, "admin"),
    ("DELETE", "/v1/models/acme/x", None, "admin"),
    ("GET", "/metrics", None, "admin"),
]


def test_health_needs_no_key(router):
    reply = call(router, "GET", "/health")
    assert reply.status == 200 and reply.json == {"status": "ok"}


@pytest.mark.parametrize(("method", "path", "body", "scope"), SCOPED_ROUTES)
def test_every_route_checks_key_and_scope(router, keys, method, path, body, scope):
    _error(call(router, method, path, None, body), 401, "invalid_api_key")
    _error(call(router, method, path, "sk-not-a-real-key", body), 401, "invalid_api_key")
    _error(
        call(router, method, path, body=body, headers={"Authorization": ADMIN}),
        401,
        "invalid_api_key",
    )  # no "Bearer"
    for other in ("api", "node", "admin"):
        reply = call(router, method, path, keys[other], body)
        if other == scope or other == "admin":
            assert reply.status not in (401, 403), (other, reply.status, reply.body)
        else:
            _error(reply, 403, "insufficient_scope")


def test_openapi_needs_a_key_and_lists_every_route(router, keys):
    _error(call(router, "GET", "/openapi.json"), 401, "invalid_api_key")
    doc = call(router, "GET", "/openapi.json", keys["api"]).json
    assert doc["openapi"].startswith("3.")
    documented = {
        (m.upper(), p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"
    }
    expected = {(m, re.sub(r"/acme/x|/n1|/key_nope", "/{}", p)) for m, p, _, _ in SCOPED_ROUTES}
    normalised = {(m, re.sub(r"\{[a-z_]+\}", "{}", p)) for m, p in documented}
    assert expected | {("GET", "/health"), ("GET", "/openapi.json")} <= normalised


# -- keys ----------------------------------------------------------------------------------


def test_keys_lifecycle(router, keys):
    created = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "temp"})
    assert created.status == 201
    key = created.json["key"]
    assert key.startswith("sk-") and len(key) > 40
    assert created.json["scope"] == "api" and created.json["name"] == "temp"
    assert call(router, "GET", "/v1/models", key).status == 200

    listed = call(router, "GET", "/v0/keys", ADMIN)
    assert listed.status == 200
    ids = {k["id"]: k for k in listed.json["keys"]}
    assert ids[created.json["id"]]["scope"] == "api"
    assert key.encode() not in listed.body  # never the key itself
    assert hashlib.sha256(key.encode()).hexdigest().encode() not in listed.body
    assert all("key" not in k for k in listed.json["keys"])

    assert call(router, "DELETE", f"/v0/keys/{created.json['id']}", ADMIN).status == 204
    _error(call(router, "GET", "/v1/models", key), 401, "invalid_api_key")
    _error(call(router, "DELETE", f"/v0/keys/{created.json['id']}", ADMIN), 404, "key_not_found")


@pytest.mark.parametrize("body", [{}, {"scope": "root"}, {"scope": "api", "name": 3}])
def test_key_creation_validates(router, body):
    _error(call(router, "POST", "/v0/keys", ADMIN, body), 400, "invalid_request_error")


# -- models --------------------------------------------------------------------------------


def test_register_model_stores_pinned_manifest(router, hub, keys):
    reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "Acme/Tiny-GGUF"})
    assert reply.status == 201, reply.json
    model = reply.json
    assert model["id"] == "acme/tiny-gguf"  # the repo name, lowercased
    assert model["repo"] == "Acme/Tiny-GGUF"
    assert SHA40.match(model["revision"])
    assert model["format"] == "gguf" and model["filename"] == "tiny-Q4_K_M.gguf"
    assert model["quantization"] == "Q4_K_M" and model["size_bytes"] == len(GGUF)

    listed = call(router, "GET", "/v0/models", keys["node"]).json["models"]
    row = next(m for m in listed if m["id"] == "acme/tiny-gguf")
    assert set(row) == {
        "id",
        "repo",
        "revision",
        "format",
        "filename",
        "size_bytes",
        "quantization",
        "updated_at",
    }
    assert row["revision"] == model["revision"]

    for path in ("acme/tiny-gguf", "acme%2Ftiny-gguf", "Acme%2FTiny-GGUF"):
        manifest = call(router, "GET", f"/v0/models/registry/{path}/manifest.json", keys["node"])
        assert manifest.status == 200, (path, manifest.body)
    doc = manifest.json
    assert doc["model_id"] == "acme/tiny-gguf" and doc["revision"] == model["revision"]
    assert doc["total_size_bytes"] == len(GGUF) and doc["chat_template"] is None
    (file,) = doc["files"]
    assert file == {
        "filename": "tiny-Q4_K_M.gguf",
        "format": "gguf",
        "size_bytes": len(GGUF),
        "sha256": hashlib.sha256(GGUF).hexdigest(),
        "url": f"{hub}/Acme/Tiny-GGUF/resolve/{model['revision']}/tiny-Q4_K_M.gguf",
        "priority": 0,
        "optional": False,
        "backends": [],
    }

    entry = call(router, "GET", "/v1/models/acme/tiny-gguf", keys["api"]).json
    assert entry["object"] == "model" and entry["owned_by"] == "llmlb"
    assert entry["ready"] is False and entry["nodes_ready"] == 0
    assert entry["repo"] == "Acme/Tiny-GGUF" and entry["size_bytes"] == len(GGUF)

    _error(
        call(router, "POST", "/v1/models/register", ADMIN, {"repo": "Acme/Tiny-GGUF"}),
        409,
        "model_exists",
    )


def test_register_with_id_url_template_and_delete(router, hub, keys):
    body = {"repo": f"{hub}/acme/other", "id": "Team/Other", "chat_template": "{{ x }}"}
    reply = call(router, "POST", "/v1/models/register", ADMIN, body)
    assert reply.status == 201, reply.json
    assert reply.json["id"] == "team/other"
    manifest = call(router, "GET", "/v0/models/registry/team%2Fother/manifest.json", keys["node"])
    assert manifest.json["chat_template"] == "{{ x }}"
    ids = [m["id"] for m in call(router, "GET", "/v1/models", keys["api"]).json["data"]]
    assert "team/other" in ids

    assert call(router, "DELETE", "/v1/models/team/other", ADMIN).status == 204
    _error(call(router, "GET", "/v1/models/team/other", keys["api"]), 404, "model_not_found")
    _error(
        call(router, "GET", "/v0/models/registry/team/other/manifest.json", keys["node"]),
        404,
        "model_not_found",
    )
    _error(call(router, "DELETE", "/v1/models/team%2Fother", ADMIN), 404, "model_not_found")
    assert "team/other" not in [
        m["id"] for m in call(router, "GET", "/v0/models", keys["node"]).json["models"]
    ]


def test_register_errors_store_nothing(router):
    cases = [
        ({"repo": "acme/two"}, 400, "ambiguous_artifacts"),
        ({"repo": "acme/nothing"}, 400, "no_supported_artifacts"),
        ({"repo": "acme/missing"}, 404, "hub_repo_not_found"),
        ({"repo": "acme/flaky"}, 502, "upstream_error"),
        ({"repo": "not a repo"}, 400, "invalid_model_id"),
        ({"repo": "acme/other", "id": "../etc"}, 400, "invalid_model_id"),
        ({"repo": "acme/other", "id": "Bad Id!"}, 400, "invalid_model_id"),
        ({}, 400, "invalid_request_error"),
        ({"repo": 5}, 400, "invalid_request_error"),
    ]
    before = call(router, "GET", "/v0/models", ADMIN).json["models"]
    for body, status, code in cases:
        reply = call(router, "POST", "/v1/models/register", ADMIN, body)
        _error(reply, status, code)
        if code == "ambiguous_artifacts":
            assert set(reply.json["error"]["choices"]) == {"two-Q4_K_M.gguf", "two-Q8_0.gguf"}
    assert call(router, "GET", "/v0/models", ADMIN).json["models"] == before

    hinted = call(
        router,
        "POST",
        "/v1/models/register",
        ADMIN,
        {"repo": "acme/two", "filename": "two-Q8_0.gguf"},
    )
    assert hinted.status == 201 and hinted.json["filename"] == "two-Q8_0.gguf"


def test_model_lookups_reject_bad_ids(router, keys):
    _error(call(router, "GET", "/v1/models/Bad%20Id", keys["api"]), 400, "invalid_model_id")
    _error(
        call(router, "GET", "/v0/models/registry/a/../b/manifest.json", keys["node"]),
        400,
        "invalid_model_id",
    )
    _error(call(router, "GET", "/v1/models/acme/unknown", keys["api"]), 404, "model_not_found")


# -- nodes ---------------------------------------------------------------------------------


def test_node_registration_heartbeat_and_listing(router, keys):
    node = {
        "node_id": "gpu-1",
        "url": "http://127.0.0.1:9/",
        "runtimes": ["llama_cpp"],
        "gpu": {"backend": "cpu"},
        "slots": 4,
        "models": [
            {"id": "Local/Hand-Placed", "state": "ready", "format": "gguf", "size_bytes": 123}
        ],
    }
    reply = call(router, "POST", "/v0/nodes", keys["node"], node)
    assert reply.status == 201, reply.json
    assert reply.json["node_id"] == "gpu-1" and reply.json["heartbeat_interval_s"] > 0
    token = reply.json["sync_token"]
    assert isinstance(token, str) and len(token) >= 32

    models = {m["id"]: m for m in call(router, "GET", "/v1/models", keys["api"]).json["data"]}
    assert models["local/hand-placed"]["ready"] is True  # placed by hand on the node
    assert (
        models["local/hand-placed"]["nodes_ready"] == 1
        and models["local/hand-placed"]["repo"] is None
    )

    beat = {
        "active_requests": 2,
        "models": [
            {"id": "acme/tiny-gguf", "state": "ready"},
            {"id": "acme/two", "state": "downloading", "progress": {"bytes": 5, "total": 10}},
            {"id": "local/broken", "state": "failed", "error": "bad file"},
        ],
    }
    assert call(router, "POST", "/v0/nodes/gpu-1/heartbeat", keys["node"], beat).status == 200
    models = {m["id"]: m for m in call(router, "GET", "/v1/models", keys["api"]).json["data"]}
    assert models["acme/tiny-gguf"]["ready"] is True
    assert models["acme/tiny-gguf"]["nodes_ready"] == 1
    assert "local/hand-placed" not in models and "local/broken" not in models

    listed = call(router, "GET", "/v0/nodes", ADMIN)
    assert token.encode() not in listed.body  # the sync token never leaves
    (gpu1,) = [n for n in listed.json["nodes"] if n["node_id"] == "gpu-1"]
    assert gpu1["status"] == "online" and gpu1["slots"] == 4 and gpu1["active_requests"] == 2
    assert gpu1["url"] == "http://127.0.0.1:9" and gpu1["gpu"] == {"backend": "cpu"}
    states = {m["id"]: m for m in gpu1["models"]}
    assert states["acme/two"]["progress"] == {"bytes": 5, "total": 10}
    assert states["local/broken"]["error"] == "bad file"

    _error(
        call(router, "POST", "/v0/nodes/ghost/heartbeat", keys["node"], {}), 404, "node_not_found"
    )
    assert call(router, "DELETE", "/v0/nodes/gpu-1", keys["node"]).status == 204
    _error(call(router, "DELETE", "/v0/nodes/gpu-1", keys["node"]), 404, "node_not_found")
    models = {m["id"]: m for m in call(router, "GET", "/v1/models", keys["api"]).json["data"]}
    assert models["acme/tiny-gguf"]["ready"] is False


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"url": "ftp://x"},
        {"url": "http://127.0.0.1:9", "node_id": "bad id"},
        {"url": "http://127.0.0.1:9", "slots": 0},
        {"url": "http://127.0.0.1:9", "models": [{"id": "x", "state": "weird"}]},
        {"url": "http://127.0.0.1:9", "models": "nope"},
    ],
)
def test_node_registration_validates(router, keys, body):
    reply = call(router, "POST", "/v0/nodes", keys["node"], body)
    assert reply.status == 400 and reply.json["error"]["code"] in (
        "invalid_request_error",
        "invalid_node_id",
    ), reply.json


# -- bad input -----------------------------------------------------------------------------


def test_bad_bodies_and_unknown_routes(router, keys):
    for raw in (b"{not json", b"", b"[1, 2]"):
        reply = call(
            router, "POST", "/v0/keys", ADMIN, raw=raw, headers={"Content-Type": "application/json"}
        )
        _error(reply, 400, "invalid_request_error")
    big = {"scope": "api", "name": "x" * 70000}
    _error(call(router, "POST", "/v0/keys", ADMIN, big), 413, "request_too_large")
    big_chat = {"model": "acme/x", "messages": [{"role": "user", "content": "x" * 70000}]}
    _error(
        call(router, "POST", "/v1/chat/completions", keys["api"], big_chat),
        413,
        "request_too_large",
    )
    _error(call(router, "GET", "/no/such/route", ADMIN), 404, "not_found")
    _error(call(router, "GET", "/v1/chat/completions", keys["api"]), 405, "method_not_allowed")
    reply = call(router, "PUT", "/v0/keys", ADMIN, {})
    _error(reply, 405, "method_not_allowed")
    assert set(reply.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_metrics_are_prometheus_text(router):
    reply = call(router, "GET", "/metrics", ADMIN)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert "llmlb_router_http_requests_total" in text
    assert 'llmlb_router_model_registrations_total{result="ok"}' in text


# -- hub down, offline nodes, restart -------------------------------------------------------


def test_unreachable_hub_gives_502_and_stores_nothing(spawn, tmp_path):
    env = {"HF_ENDPOINT": free_url(), "LLMLB_HEARTBEAT_INTERVAL_S": "0.5"}
    url = start_router(spawn, tmp_path / "home", ADMIN, env=env)
    _error(
        call(url, "POST", "/v1/models/register", ADMIN, {"repo": "acme/other"}),
        502,
        "upstream_error",
    )
    assert call(url, "GET", "/v0/models", ADMIN).json == {"models": []}
    assert call(url, "GET", "/v1/models", ADMIN).json == {"object": "list", "data": []}

    # A node that stops heart-beating goes offline after 3 missed beats, and back on a beat.
    node = {"node_id": "n1", "url": "http://127.0.0.1:9", "models": ["acme/m"]}
    assert call(url, "POST", "/v0/nodes", ADMIN, node).status == 201

    def status() -> str:
        return call(url, "GET", "/v0/nodes", ADMIN).json["nodes"][0]["status"]

    def offered() -> list[str]:
        return [m["id"] for m in call(url, "GET", "/v1/models", ADMIN).json["data"]]

    assert offered() == ["acme/m"]
    # an offline node's models are no longer offered
    wait_until(lambda: offered() == [], timeout=10, message="node offline")
    assert status() == "offline"
    assert call(url, "POST", "/v0/nodes/n1/heartbeat", ADMIN, {}).status == 200
    assert status() == "online"
    assert offered() == ["acme/m"]


def test_state_survives_restart(spawn, tmp_path):
    root = tmp_path / "hub"
    make_repo(root, "acme/other", {"other.gguf": GGUF})
    hub = start_hub(spawn, root)
    home = tmp_path / "home"
    env = {"HF_ENDPOINT": hub}
    url = start_router(spawn, home, ADMIN, env=env)
    assert call(url, "POST", "/v1/models/register", ADMIN, {"repo": "acme/other"}).status == 201
    api_key = call(url, "POST", "/v0/keys", ADMIN, {"scope": "api"}).json["key"]
    node = {"node_id": "n1", "url": "http://127.0.0.1:9", "slots": 2}
    assert call(url, "POST", "/v0/nodes", ADMIN, node).status == 201
    manifest = call(url, "GET", "/v0/models/registry/acme/other/manifest.json", ADMIN).json
    assert url.proc.stop() is not None

    hub.proc.stop()  # a hub outage after registration must not matter
    url2 = start_router(spawn, home, ADMIN, env=env)
    assert call(url2, "GET", "/v0/models/registry/acme/other/manifest.json", ADMIN).json == manifest
    assert call(url2, "GET", "/v1/models", api_key).status == 200
    nodes = call(url2, "GET", "/v0/nodes", ADMIN).json["nodes"]
    assert [(n["node_id"], n["slots"]) for n in nodes] == [("n1", 2)]
    # a node heard only by the previous router process is offline until it heartbeats again
    assert nodes[0]["status"] == "offline"
    assert call(url2, "POST", "/v0/nodes/n1/heartbeat", ADMIN, {}).status == 200
    assert call(url2, "GET", "/v0/nodes", ADMIN).json["nodes"][0]["status"] == "online"
    assert (home / "lb.db").exists()
