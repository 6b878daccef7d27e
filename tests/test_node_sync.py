"""The node's resolver and sync in-process, against a real hub stand-in and router.

Reports (ready right after a download, format and size of hand-placed models) and the sync
``delete`` rule (only models this node downloaded are removed).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from llmlb.model_storage import ModelStorage
from llmlb.node.fleet.sync import RouterSync
from llmlb.node.inference.engine import Engine
from llmlb.node.metrics import NodeMetrics
from llmlb.node.models.download.staging import was_downloaded
from llmlb.node.models.resolver import Resolver, RouterAccess
from llmlb.node.settings import NodeSettings

from tests.factories import gguf_bytes
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key
from tests.procs import spawner
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-node-sync"
TINY = gguf_bytes()
REPOS = ("org/fetched", "org/also-fetched")


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        root = tmp_path_factory.mktemp("hub")
        for repo in REPOS:
            make_repo(root, repo, {"model.gguf": TINY})
        hub = start_hub(spawn, root)
        url = start_router(spawn, tmp_path_factory.mktemp("home"), ADMIN, env={"HF_ENDPOINT": hub})
        for repo in REPOS:
            assert call(url, "POST", "/v1/models/register", ADMIN, {"repo": repo}).status == 201
        yield {"url": url, "key": create_key(url, ADMIN, "node"), "hub": hub}
    finally:
        stop_all()


def _parts(router, store: Path) -> tuple[Resolver, RouterSync, Engine]:
    storage = ModelStorage(store)
    metrics = NodeMetrics()
    engine = Engine(storage, metrics)
    resolver = Resolver(
        storage,
        store,
        RouterAccess(router["url"], router["key"]),
        metrics,
        allowed_hosts=["127.0.0.1"],
        token=None,
    )
    settings = NodeSettings(router_url=router["url"], api_key=router["key"], models_dir=store)
    sync = RouterSync(settings, "node-test", resolver, engine, gpu=lambda: {"backend": "cpu"})
    return resolver, sync, engine


def _place(store: Path, model_id: str) -> None:
    (store / model_id).mkdir(parents=True)
    (store / model_id / "model.gguf").write_bytes(TINY)


def test_downloaded_model_is_reported_ready_at_once(router, tmp_path):
    async def scenario():
        resolver, sync, engine = _parts(router, tmp_path)
        try:
            await resolver.refresh()
            path = await resolver.ensure("org/fetched")
            assert path is not None
            # No heartbeat or rescan in between: the model is listed the moment it is ready.
            return {r["id"]: r for r in sync.model_reports()}
        finally:
            await resolver.close()
            await engine.close()

    reports = asyncio.run(scenario())
    assert reports["org/fetched"]["state"] == "ready"
    assert reports["org/fetched"]["format"] == "gguf"
    assert reports["org/fetched"]["size_bytes"] == len(TINY)


def test_hand_placed_models_are_reported_with_format_and_size(router, tmp_path):
    _place(tmp_path, "local/hand")

    async def scenario():
        resolver, sync, engine = _parts(router, tmp_path)
        await resolver.refresh()
        await engine.close()
        return sync._registration()["models"]

    (report,) = asyncio.run(scenario())
    assert report == {
        "id": "local/hand",
        "state": "ready",
        "format": "gguf",
        "size_bytes": len(TINY),
        "servable": True,
    }


def test_sync_delete_removes_only_models_the_node_downloaded(router, tmp_path):
    _place(tmp_path, "org/also-fetched-by-hand")
    _place(tmp_path, "local/hand")

    async def scenario():
        resolver, sync, engine = _parts(router, tmp_path)
        try:
            await resolver.refresh()
            assert await resolver.ensure("org/also-fetched") is not None
            assert was_downloaded(tmp_path, "org/also-fetched")
            sync.handle_sync(
                "delete", ["org/also-fetched", "local/hand", "org/Also-Fetched-By-Hand"]
            )
            await asyncio.gather(*sync._tasks)
            return {r["id"] for r in sync.model_reports()}
        finally:
            await resolver.close()
            await engine.close()

    listed = asyncio.run(scenario())
    assert listed == {"local/hand", "org/also-fetched-by-hand"}
    assert ModelStorage(tmp_path).list_available() == ["local/hand", "org/also-fetched-by-hand"]
    assert not (tmp_path / "org" / "also-fetched").exists()
    assert not was_downloaded(tmp_path, "org/also-fetched")


def _handled(router, handler: str) -> float:
    """Requests the router's ``handler`` answered so far (every status, every worker)."""
    text = call(router["url"], "GET", "/metrics", ADMIN).body.decode()
    prefix = "llmlb_router_http_requests_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix) and f'handler="{handler}"' in line
    )


@pytest.mark.parametrize("action", ["register", "retry"])
def test_sync_notice_asks_the_router_for_the_named_models_only(router, tmp_path, action):
    listed, manifests = _handled(router, "node_models"), _handled(router, "manifest")

    async def scenario():
        resolver, sync, engine = _parts(router, tmp_path)
        try:
            await resolver.refresh()
            sync.handle_sync(action, ["org/Fetched", "org/never-registered"])
            await asyncio.gather(*sync._tasks)
            await asyncio.gather(*list(resolver._tasks.values()))
            return {r["id"]: r["state"] for r in sync.model_reports()}
        finally:
            await resolver.close()
            await engine.close()

    assert asyncio.run(scenario()) == {"org/fetched": "ready"}  # not org/also-fetched
    assert was_downloaded(tmp_path, "org/fetched")
    assert _handled(router, "node_models") == listed  # no /v0/models list
    assert _handled(router, "manifest") == manifests + 2  # one manifest per named model
