"""A node with ``--router-auth on`` serves inference only to its router (or a node key)."""

from __future__ import annotations

import pytest
from llmlb.cli.node import _router_auth

from tests.node_fixtures import create_key, place_model, start_node
from tests.procs import wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-router-node-auth"
MODEL = "local/gemma"


@pytest.mark.parametrize(
    ("mode", "host", "expected"),
    [
        ("auto", "127.0.0.1", False),
        ("auto", "::1", False),
        ("auto", "localhost", False),
        ("auto", "0.0.0.0", True),
        ("auto", "10.1.2.3", True),
        ("auto", "gpu-host.example", True),
        ("on", "127.0.0.1", True),
        ("off", "0.0.0.0", False),
    ],
)
def test_router_auth_defaults_to_on_off_loopback(mode, host, expected):
    assert _router_auth(mode, host) is expected


def test_router_token_is_required_and_presented_by_the_proxy(spawn, tmp_path, gemma_gguf):
    router = start_router(spawn, tmp_path / "home", ADMIN)
    store = tmp_path / "store"
    place_model(store, MODEL, gemma_gguf)
    node = start_node(
        spawn, router, create_key(router, ADMIN, "node"), store, "--router-auth", "on"
    )
    api_key = create_key(router, ADMIN, "api")

    def ready() -> bool:
        reply = call(router, "GET", f"/v1/models/{MODEL}", api_key)
        return reply.status == 200 and reply.json["ready"]

    wait_until(ready, timeout=30, message="model ready on the router")
    body = {"model": MODEL, "prompt": "Paris is the capital of", "max_tokens": 2}
    # Straight to the node: neither no key nor a router api key opens it.
    for key in (None, api_key):
        reply = call(node, "POST", "/v1/completions", key, body)
        assert reply.status == 401 and reply.json["error"]["code"] == "invalid_api_key"
    assert call(node, "GET", "/v1/models", api_key).status == 401
    # Through the router, which presents the node's token.
    reply = call(router, "POST", "/v1/completions", api_key, body, timeout=120)
    assert reply.status == 200, reply.body
    assert reply.json["choices"][0]["text"]
