"""Starting a real node (``llmlb node``) for tests, and small helpers to talk to it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.procs import LLMLB, Proc, free_port, spawner, wait_until
from tests.router_fixtures import call, start_router


class NodeUrl(str):
    """The node's base URL (a ``str``), carrying its process, port and store."""

    proc: Proc
    port: int
    models_dir: Path


def start_node(
    spawn: Callable[..., Proc],
    router_url: str,
    node_key: str | None,
    models_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    wait_ready: bool = True,
) -> NodeUrl:
    """Start ``llmlb node`` on a loopback port; return its base URL once ``/ready`` is 200.

    Args:
        spawn: the ``spawn`` fixture (the process is stopped when the test ends).
        router_url: the router's base URL ('' for none).
        node_key: a node-scope key.
        models_dir: the store (``--models-dir``).
        extra: more flags, e.g. ``"--allow-host", "localhost"``.
        env: more environment (e.g. ``HF_ENDPOINT``, ``HF_TOKEN``).
        port: a fixed port (to restart a node on the same address); default a free one.
        wait_ready: wait for ``/ready`` (else only for ``/health``).
    """
    port = port or free_port()
    argv = [
        *LLMLB,
        "node",
        "--router",
        router_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models-dir",
        str(models_dir),
        "--ctx-size",
        "1024",
        *extra,
    ]
    if node_key:
        argv += ["--api-key", node_key]
    proc = spawn(argv, env=env or {}, name="node")
    url = NodeUrl(f"http://127.0.0.1:{port}")
    proc.wait_http(f"{url}/ready" if wait_ready else f"{url}/health", timeout=60)
    url.proc = proc
    url.port = port
    url.models_dir = models_dir
    return url


def create_key(router_url: str, admin_key: str, scope: str) -> str:
    """A new router key of ``scope``."""
    reply = call(router_url, "POST", "/v0/keys", admin_key, {"scope": scope})
    assert reply.status == 201, reply.body
    return reply.json["key"]


def model_status(node_url: str, model_id: str) -> dict | None:
    """The node's ``/api/models/status`` entry for ``model_id`` (``None`` if absent)."""
    reply = call(node_url, "GET", "/api/models/status")
    for entry in reply.json["models"]:
        if entry["id"] == model_id:
            return entry
    return None


def sse_events(body: bytes) -> list[dict]:
    """Decode an SSE body into its JSON events (``[DONE]`` dropped)."""
    events = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(orjson.loads(line[6:]))
    return events


def place_model(models_dir: Path, model_id: str, gguf: Path, template: str | None = None) -> Path:
    """Hand-place ``gguf`` as ``model_id`` in a store (hard link), with a template sidecar."""
    import os
    import shutil

    target = models_dir / model_id
    target.mkdir(parents=True, exist_ok=True)
    dest = target / gguf.name
    try:
        os.link(gguf, dest)
    except OSError:
        shutil.copyfile(gguf, dest)
    if template is not None:
        (target / "chat_template.jinja").write_text(template)
    return target


@contextlib.contextmanager
def model_behind_router(
    factory: pytest.TempPathFactory, place: Callable[[Path], object], model: str, admin: str
) -> Iterator[dict]:
    """A router and one node whose store ``place`` filled with ``model``, for a test module,
    once the router sees the model ready: ``{"router", "node", "key"}`` (an api key)."""
    spawn, stop_all = spawner(factory.mktemp("procs"))
    try:
        router = start_router(spawn, factory.mktemp("home"), admin)
        store = factory.mktemp("store")
        place(store)
        node = start_node(spawn, router, create_key(router, admin, "node"), store)
        wait_until(
            lambda: (model_status(node, model) or {}).get("state") == "ready",
            timeout=60,
            message="the model ready on the node",
        )
        key = create_key(router, admin, "api")
        wait_until(
            lambda: call(router, "GET", f"/v1/models/{model}", key).status == 200,
            timeout=30,
            message="the router sees the node's model",
        )
        yield {"router": router, "node": node, "key": key}
    finally:
        stop_all()


def gemma_behind_router(
    factory: pytest.TempPathFactory, gemma_gguf: Path, model: str, admin: str
) -> contextlib.AbstractContextManager[dict]:
    """A router and one node holding the real Gemma as ``model`` (hand-placed, with its chat
    template), for a test module: ``{"router", "node", "key"}`` (an api key)."""
    return model_behind_router(
        factory,
        lambda store: place_model(store, model, gemma_gguf, GEMMA_CHAT_TEMPLATE),
        model,
        admin,
    )


def place_smollm2(models_dir: Path, gguf: Path, model: str = "smollm2-135m-instruct") -> Path:
    """Hand-place SmolLM2 as ``model`` with the sampling defaults ``llmlb up`` stores."""
    from llmlb.cli.demo import SMOLLM2_DEFAULTS
    from llmlb.node.inference import model_defaults

    target = place_model(models_dir, model, gguf)
    model_defaults.write(target, SMOLLM2_DEFAULTS)
    return target


def smollm2_behind_router(
    factory: pytest.TempPathFactory, smollm2_gguf: Path, model: str, admin: str
) -> contextlib.AbstractContextManager[dict]:
    """A router and one node holding the real SmolLM2-135M-Instruct as ``model`` (its ChatML
    template is in the GGUF; its sampling defaults beside it), for a test module:
    ``{"router", "node", "key"}`` (an api key)."""
    return model_behind_router(
        factory, lambda store: place_smollm2(store, smollm2_gguf, model), model, admin
    )
