"""A node with ``--router-auth on`` serves inference only to its router (or a node key)."""

from __future__ import annotations

import http.client
import sqlite3
from urllib.parse import urlsplit

import orjson
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


NODE_KEY = "sk-node-own-key-for-tests"
NON_ASCII_BEARER = b"Bearer \xff\xfe"


def _raw(base_url: str, method: str, path: str, authorization: bytes, body: bytes = b"{}"):
    """One request with a raw (latin-1) ``Authorization`` header: ``(status, json)``."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest(method, path)
        conn.putheader("Authorization", authorization)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        payload = resp.read()
        assert resp.getheader("content-type", "").startswith("application/json"), payload
        return resp.status, orjson.loads(payload)
    finally:
        conn.close()


def _sync_token(router) -> str:
    with sqlite3.connect(router.home / "lb.db") as db:
        (token,) = db.execute("SELECT sync_token FROM nodes").fetchone()
    return token


def test_node_and_router_auth_hold_against_bad_credentials_and_bodies(spawn, tmp_path):
    router = start_router(spawn, tmp_path / "home", ADMIN)
    node = start_node(
        spawn,
        router,
        create_key(router, ADMIN, "node"),
        tmp_path / "store",
        "--router-auth",
        "on",
        "--require-key",
        NODE_KEY,
        env={"LLMLB_MAX_BODY_BYTES": "4096"},  # small: an oversized body fits socket buffers
    )
    wait_until(lambda: call(node, "GET", "/ready").json["registered"], message="registered")
    token = _sync_token(router)

    # A non-ASCII bearer is an unknown credential: 401 in the error shape, never a 500.
    for base, method, path in [
        (node, "GET", "/v1/models"),
        (node, "POST", "/v1/chat/completions"),
        (node, "POST", "/api/models/sync"),
        (node, "GET", "/api/models/status"),
        (node, "GET", "/metrics"),
        (router, "GET", "/v1/models"),
        (router, "POST", "/v1/chat/completions"),
        (router, "POST", "/v0/nodes"),
        (router, "GET", "/v0/nodes"),
        (router, "GET", "/metrics"),
    ]:
        status, body = _raw(base, method, path, NON_ASCII_BEARER)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)
    status, _ = _raw(node, "GET", "/metrics", b"Bearer " + NODE_KEY.encode() + b"\xe9")
    assert status == 401

    # Off loopback (--router-auth on), status and metrics need the router's token or the key.
    for path in ("/api/models/status", "/metrics"):
        reply = call(node, "GET", path)
        assert reply.status == 401 and reply.json["error"]["code"] == "invalid_api_key"
        assert call(node, "GET", path, "sk-wrong").status == 401
        assert call(node, "GET", path, NODE_KEY).status == 200
        assert call(node, "GET", path, token).status == 200

    # /api/models/sync names models by valid ids only.
    for bad in ("../x", ".staging/x", "a b", "org/.hidden"):
        reply = call(node, "POST", "/api/models/sync", token, {"models": ["ok/model", bad]})
        assert reply.status == 400, reply.body
        assert reply.json["error"]["code"] == "invalid_model_id"
    reply = call(node, "POST", "/api/models/sync", token, {"models": ["Org/Model"]})
    assert reply.status == 202 and reply.json["accepted"] == ["org/model"]

    # Bodies are limited as on the router (LLMLB_MAX_BODY_BYTES): 413 in the error shape.
    big = {"model": "acme/x", "messages": [{"role": "user", "content": "x" * 8192}]}
    for path, key in [("/v1/chat/completions", NODE_KEY), ("/api/models/sync", token)]:
        reply = call(node, "POST", path, key, big)
        assert reply.status == 413, reply.body
        assert reply.json["error"]["code"] == "request_too_large"
