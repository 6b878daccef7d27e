"""Load during the hash: a GGUF loads while its sha256 finishes, and is never served unverified.

The hub stand-in corrupts one byte in the middle of the Gemma GGUF (``--fault corrupt``,
once): the node's resolver (in this process, with the real engine, against a real router and
hub over HTTP) starts loading the landed bytes, finds the sha256 wrong, drops that load and
refetches. Every load probes the resolver as a request would the moment it finishes: the
answer must be ``model_not_ready``, never tokens.
"""

from __future__ import annotations

import asyncio
import hashlib

import orjson
import pytest
from llmlb.errors import ApiError
from llmlb.model_storage import ModelStorage
from llmlb.node.api import openai_response as openai_api
from llmlb.node.inference.engine import Engine, EngineOptions
from llmlb.node.metrics import NodeMetrics
from llmlb.node.models.resolver import Resolver, RouterAccess

from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-load-during-hash"
REPO = "faults/gemma-corrupt"


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def corrupt_hub(spawn, tmp_path, gemma_gguf):
    root = tmp_path / "hub"
    make_repo(root, REPO, {gemma_gguf.name: gemma_gguf})
    log = tmp_path / "hub.jsonl"
    hub = start_hub(
        spawn, root, "--log-requests", str(log), "--fault", f"corrupt:repo={REPO},times=1"
    )
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": REPO}).status == 201
    return {"hub": hub, "router": router, "key": create_key(router, ADMIN, "node"), "log": log}


def test_corrupt_file_loaded_during_the_hash_is_dropped_refetched_and_never_served(
    corrupt_hub, tmp_path, gemma_gguf
):
    expected = _sha256(gemma_gguf)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = ModelStorage(store_dir)
    metrics = NodeMetrics()
    engine = Engine(
        store,
        metrics,
        EngineOptions(n_ctx=512, concurrency=2, max_tokens=8),
        template_lookup=lambda model_id: resolver.template_for(model_id),
    )
    resolver = Resolver(
        store,
        store_dir,
        RouterAccess(corrupt_hub["router"], corrupt_hub["key"]),
        metrics,
        allowed_hosts=["127.0.0.1"],
        token=None,
    )
    events: list[tuple] = []

    async def load(model_id: str, path: str) -> None:
        await engine.load(model_id, path)
        # A request the moment the load is done (its file maybe still unverified):
        verified = store.resolve(model_id) is not None
        try:
            await resolver.serving_path(model_id)
        except ApiError as exc:
            answer = (exc.status, exc.code)
        else:
            answer = "served"
        events.append(("loaded", path, answer, model_id in engine.loaded(), verified))

    async def unload(model_id: str) -> None:
        await engine.unload(model_id)
        events.append(("unloaded", model_id in engine.loaded()))

    resolver.downloaded.subscribe(engine.load)
    resolver.load_during_hash(load, unload)

    async def scenario() -> tuple[str | None, dict]:
        try:
            path = await asyncio.wait_for(resolver.ensure(REPO), timeout=120)
            assert resolver.state_of(REPO) is None  # ready
            body = {"model": REPO, "prompt": "Hello"}
            reply = await openai_api.complete(engine, REPO, path, body)
            return path, reply
        finally:
            await resolver.close()
            await engine.close()

    path, reply = asyncio.run(scenario())

    fired = [r for r in map(orjson.loads, corrupt_hub["log"].read_bytes().splitlines()) if
             r.get("faults")]
    assert fired, "the corrupt fault never fired"
    # The corrupt file was loaded during its hash, refused while unverified and unloaded
    # before anything else loaded. The refetched file loads during its hash too, unless its
    # hash won the race with the unload before it (then it was promoted first and loads
    # the usual way); neither was served while unverified.
    loads = [e for e in events if e[0] == "loaded"]
    assert 1 <= len(loads) <= 2, events
    assert events.index(("unloaded", False)) == 1, events
    assert loads[0][2] == (503, "model_not_ready") and not loads[0][4], events
    for _, loaded_from, answer, resident, verified in loads:
        assert answer == ((503, "model_not_ready") if not verified else "served"), events
        assert resident
        assert ".staging" in loaded_from  # loaded from the landed bytes, before promotion
    # The model ends refetched, verified, promoted and loaded (by the second load ahead).
    assert path is not None and _sha256(path) == expected
    assert store.validate(REPO) == []
    assert reply["usage"]["completion_tokens"] > 0


def test_a_resolver_with_a_router_starts_its_transfer_worker_before_any_download(
    monkeypatch, tmp_path
):
    from llmlb.node.models.download import workers

    from tests.procs import wait_until

    monkeypatch.setattr(workers, "_shared", None)  # a fresh pool: none started yet
    store = ModelStorage(tmp_path)
    Resolver(
        store,
        tmp_path,
        RouterAccess("http://127.0.0.1:9", None),
        NodeMetrics(),
        allowed_hosts=[],
        token=None,
    )
    try:
        wait_until(lambda: workers.shared_pool().pids(), timeout=10, message="worker started")
    finally:
        workers.shared_pool().close()
