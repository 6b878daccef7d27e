"""One download per model: concurrent requests, a sync racing a request, two nodes on one store.

The hub stand-in logs every request with the body bytes it sent; a model counts as
downloaded once when the hub served its file's bytes once (plus the 1-byte range probe).
Downloads are slowed (per-connection bandwidth cap, two connections) so they overlap.
"""

from __future__ import annotations

import re
import threading

import orjson
import pytest

from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, model_status, start_node
from tests.procs import free_port, spawner, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-node-sharing"
REPOS = ("google/flight-requests", "google/flight-sync", "google/flight-shared")
SLOW = ("--connections", "2")


@pytest.fixture(scope="module")
def hub_router(tmp_path_factory, gemma_gguf):
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        root = tmp_path_factory.mktemp("hub")
        for repo in REPOS:
            make_repo(root, repo, {gemma_gguf.name: gemma_gguf})
        log = tmp_path_factory.mktemp("logs") / "hub.jsonl"
        hub = start_hub(spawn, root, "--bandwidth", "100M", "--log-requests", str(log))
        router = start_router(
            spawn, tmp_path_factory.mktemp("home"), ADMIN, env={"HF_ENDPOINT": hub}
        )
        yield {
            "hub": hub,
            "log": log,
            "router": router,
            "key": create_key(router, ADMIN, "node"),
            "size": gemma_gguf.stat().st_size,
            "tmp": tmp_path_factory,
        }
    finally:
        stop_all()


def _node(spawn, env, store, *, notified: bool):
    """A node on ``store`` (stopped after the test, so it pulls nothing later tests register);
    unless ``notified``, it advertises a dead URL, so no sync notification reaches it."""
    extra = [*SLOW]
    if not notified:
        extra += ["--advertise-url", f"http://127.0.0.1:{free_port()}"]
    return start_node(
        spawn, env["router"], env["key"], store, *extra, env={"HF_ENDPOINT": env["hub"]}
    )


@pytest.fixture
def registered(hub_router):
    """Register a repo for one test; deleted after it, so later nodes do not pull it at start."""
    repos = []

    def register(repo):
        reply = call(hub_router["router"], "POST", "/v1/models/register", ADMIN, {"repo": repo})
        assert reply.status == 201, reply.body
        repos.append(repo)

    yield register
    for repo in repos:
        assert call(hub_router["router"], "DELETE", f"/v1/models/{repo}", ADMIN).status == 204


def _complete(node, model, timeout=60.0):
    body = {"model": model, "prompt": "Paris is the capital of", "max_tokens": 2}
    return call(node, "POST", "/v1/completions", body=body, timeout=timeout)


def _concurrently(*calls):
    replies: list = [None] * len(calls)

    def run(i):
        replies[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def _wait_ready(node, model):
    def settled():
        entry = model_status(node, model) or {}
        return entry if entry.get("state") in ("ready", "failed") else None

    entry = wait_until(settled, timeout=120, message=f"{model} on {node}")
    assert entry["state"] == "ready", (entry, node.proc.log())


def _served_bytes(env, repo) -> int:
    entries = [orjson.loads(x) for x in env["log"].read_bytes().splitlines() if x.strip()]
    return sum(
        e["bytes"]
        for e in entries
        if e["repo"] == repo and e["method"] == "GET" and "/resolve/" in e["path"]
    )


def _downloads(node) -> dict[str, float]:
    text = call(node, "GET", "/metrics").body.decode()
    found = re.findall(r'llmlb_node_downloads_total\{result="(\w+)"\} ([0-9.e+]+)', text)
    return {result: float(value) for result, value in found}


def _assert_downloaded_once(env, repo):
    served = _served_bytes(env, repo)
    assert env["size"] <= served < env["size"] + (1 << 20), (served, env["size"])


def test_two_concurrent_requests_for_a_missing_model_download_once(hub_router, registered, spawn):
    env, model = hub_router, REPOS[0]
    node = _node(spawn, env, env["tmp"].mktemp("store"), notified=False)
    registered(model)  # the node is not notified: only the requests make it download
    replies = _concurrently(lambda: _complete(node, model), lambda: _complete(node, model))
    assert [r.status for r in replies] == [503, 503], [r.body for r in replies]
    assert all(r.json["error"]["code"] == "model_not_ready" for r in replies)
    _wait_ready(node, model)
    assert _complete(node, model).status == 200
    _assert_downloaded_once(env, model)
    assert _downloads(node) == {"ok": 1.0}


def test_a_sync_notification_racing_requests_causes_one_download(hub_router, registered, spawn):
    env, model = hub_router, REPOS[1]
    node = _node(spawn, env, env["tmp"].mktemp("store"), notified=True)
    registered(model)  # the router notifies the node in the background ...
    replies = _concurrently(lambda: _complete(node, model), lambda: _complete(node, model))
    assert [r.status for r in replies] == [503, 503], [r.body for r in replies]
    _wait_ready(node, model)
    assert _complete(node, model).status == 200
    _assert_downloaded_once(env, model)
    assert _downloads(node) == {"ok": 1.0}


def test_two_nodes_on_one_store_download_once_and_both_serve(hub_router, registered, spawn):
    env, model = hub_router, REPOS[2]
    store = env["tmp"].mktemp("shared-store")
    first = _node(spawn, env, store, notified=False)
    second = _node(spawn, env, store, notified=False)
    assert first.port != second.port
    registered(model)
    replies = _concurrently(lambda: _complete(first, model), lambda: _complete(second, model))
    assert [r.status for r in replies] == [503, 503], [r.body for r in replies]
    _wait_ready(first, model)
    _wait_ready(second, model)
    _assert_downloaded_once(env, model)
    # One node downloaded; the other waited on the store's lock and found the model there.
    counts = [_downloads(first), _downloads(second)]
    assert sorted(counts, key=lambda c: "ok" in c) == [{"shared": 1.0}, {"ok": 1.0}]
    for node in (first, second):
        reply = _complete(node, model)
        assert reply.status == 200 and reply.json["choices"][0]["text"], reply.body
        listed = {m["id"] for m in call(node, "GET", "/v1/models").json["data"]}
        assert model in listed
