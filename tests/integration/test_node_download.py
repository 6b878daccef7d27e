"""Downloads against a misbehaving hub stand-in, a SIGKILLed node, and single flight."""

from __future__ import annotations

import threading

import orjson
import pytest
from llmlb.model_storage import ModelStorage

from tests.factories import gguf_bytes
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, model_status, start_node
from tests.procs import spawner, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-node-download"
TOKEN = "hf_secret_token_for_tests"
# ~12 MiB: large enough for parallel range requests (>= 8 MiB).
BIG = gguf_bytes(tensors=[("blk.0.weight", [3 << 20], "F32")])
FAULTS = {
    "faults/drop": "drop:repo=faults/drop,after=262144,times=2",
    "faults/status": "status:repo=faults/status,code=503,times=3",
    "faults/corrupt-once": "corrupt:repo=faults/corrupt-once,times=1",
    "faults/corrupt-always": "corrupt:repo=faults/corrupt-always,times=always",
    "faults/full": "full:repo=faults/full,times=always",
}
SURVIVED = ["faults/drop", "faults/status", "faults/corrupt-once", "faults/full"]


def _settled(node, model_id):
    entry = model_status(node, model_id) or {}
    return entry if entry.get("state") in ("ready", "failed") else None


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        root = tmp_path_factory.mktemp("hub")
        for repo in FAULTS:
            make_repo(root, repo, {"model.gguf": BIG})
        log = tmp_path_factory.mktemp("logs") / "hub.jsonl"
        faults = [arg for spec in FAULTS.values() for arg in ("--fault", spec)]
        hub = start_hub(spawn, root, "--log-requests", str(log), *faults)
        router = start_router(
            spawn, tmp_path_factory.mktemp("home"), ADMIN, env={"HF_ENDPOINT": hub}
        )
        for repo in FAULTS:
            assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": repo}).status == 201
        store = tmp_path_factory.mktemp("store")
        node = start_node(
            spawn,
            router,
            create_key(router, ADMIN, "node"),
            store,
            env={"HF_ENDPOINT": hub, "HF_TOKEN": TOKEN},
        )
        for repo in FAULTS:
            wait_until(lambda repo=repo: _settled(node, repo), timeout=120, message=repo)
        yield {"node": node, "store": store, "log": log}
    finally:
        stop_all()


@pytest.mark.parametrize("repo", SURVIVED)
def test_transient_hub_faults_are_survived(faulty, repo):
    assert model_status(faulty["node"], repo)["state"] == "ready"
    assert ModelStorage(faulty["store"]).validate(repo) == []
    fired = [r for r in _log(faulty["log"]) if r["repo"] == repo and r["faults"]]
    assert fired, f"the {repo} fault never fired"


def test_persistently_corrupt_file_fails_the_model_with_the_reason(faulty):
    # Failed downloads are retried with backoff: catch it between two tries.
    entry = wait_until(
        lambda: (
            (e := model_status(faulty["node"], "faults/corrupt-always"))["state"] == "failed" and e
        ),
        timeout=30,
    )
    assert "sha256" in entry["error"] and "faults/corrupt-always" in entry["error"]
    assert entry["attempts"] >= 1 and entry["retry_at"] > 0
    assert not (faulty["store"] / "faults" / "corrupt-always").exists()
    assert "faults/corrupt-always" not in ModelStorage(faulty["store"]).list_available()
    listed = {m["id"] for m in call(faulty["node"], "GET", "/v1/models").json["data"]}
    assert "faults/corrupt-always" not in listed
    reply = call(
        faulty["node"],
        "POST",
        "/v1/completions",
        body={"model": "faults/corrupt-always", "prompt": "x"},
    )
    assert reply.status == 503  # model_failed, or model_not_ready during a retry
    assert reply.json["error"]["code"] in ("model_failed", "model_not_ready")


def test_token_goes_to_the_allowlisted_hub(faulty):
    downloads = [r for r in _log(faulty["log"]) if "/resolve/" in r["path"]]
    assert downloads and all(r["authorization"] for r in downloads)


def _log(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_killed_mid_download_resumes_and_never_lists_a_partial_model(spawn, tmp_path, gemma_gguf):
    root = tmp_path / "hub"
    make_repo(root, "google/gemma-slow", {gemma_gguf.name: gemma_gguf})
    log = tmp_path / "hub.jsonl"
    hub = start_hub(spawn, root, "--bandwidth", "25M", "--log-requests", str(log))
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    key = create_key(router, ADMIN, "node")
    store = tmp_path / "store"
    node = start_node(spawn, router, key, store, "--connections", "2", env={"HF_ENDPOINT": hub})
    assert (
        call(router, "POST", "/v1/models/register", ADMIN, {"repo": "google/gemma-slow"}).status
        == 201
    )
    model = "google/gemma-slow"

    def request_model():
        return call(
            node,
            "POST",
            "/v1/completions",
            timeout=30,
            body={"model": model, "prompt": "Hi", "max_tokens": 2},
        )

    replies = []
    threads = [threading.Thread(target=lambda: replies.append(request_model())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in replies] == [503, 503]
    assert all(r.json["error"]["code"] == "model_not_ready" for r in replies)
    assert all(int(r.headers["retry-after"]) >= 1 for r in replies)
    wait_until(
        lambda: (
            ((model_status(node, model) or {}).get("progress") or {}).get("bytes", 0) > 20_000_000
        ),
        timeout=60,
        message="download under way",
    )
    assert model not in ModelStorage(store).list_available()
    node.proc.kill()
    assert model not in ModelStorage(store).list_available()
    assert not (store / model).exists()

    node = start_node(spawn, router, key, store, env={"HF_ENDPOINT": hub}, port=node.port)
    wait_until(lambda: _settled(node, model), timeout=120, message="model after restart")
    assert model_status(node, model)["state"] == "ready"
    assert ModelStorage(store).validate(model) == []
    assert request_model().status == 200
    # One download per node process: the first (killed) one and the one after the restart.
    probes = [r for r in _log(log) if r["range"] == "bytes=0-0" and r["method"] == "GET"]
    assert len(probes) <= 4
