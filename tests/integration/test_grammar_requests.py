"""Requests whose schemas would crash, freeze or exhaust a node, through a router with two real
Gemma nodes: each ends in a 400 in its route's error shape within seconds, a client chatting
the whole time sees only 200s, node memory stays put, and both nodes stay alive and healthy."""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.integration.test_bounded_parsing import Chatter
from tests.node_fixtures import create_key, model_status, place_model, start_node
from tests.proc_tree import descendants, gone, rss_mib
from tests.procs import spawner, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-grammar-requests-0123"
MODEL = "local/gemma-grammar"
USER = [{"role": "user", "content": "Hi"}]
HANG_BOUND_S = 60.0  # only a hang or a crash takes this long; each answer is a 400 in ms
SIGTERM_BOUND_S = 10.0  # documented: 3 s; the slack is for a machine busy with other work


def _tool(schema: dict) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


def _string(**bounds: object) -> dict:
    return {"type": "object", "properties": {"s": {"type": "string", **bounds}}}


# (what, route, body, the param the error names)
POISON = [
    (
        "maxLength 30000 tool",
        "/v1/chat/completions",
        {"tools": [_tool(_string(maxLength=30000))]},
        "tools[0].function.parameters",
    ),
    (
        "maxLength 20000 response_format",
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": _string(maxLength=20000)},
            }
        },
        "response_format",
    ),
    (
        "maxItems 100000 tool",
        "/v1/chat/completions",
        {"tools": [_tool({"type": "array", "items": {"type": "integer"}, "maxItems": 100000})]},
        "tools[0].function.parameters",
    ),
    (
        "pattern a{0,100000}",
        "/v1/chat/completions",
        {"tools": [_tool(_string(pattern="^a{0,100000}$"))]},
        "tools[0].function.parameters",
    ),
    (
        "freezing pattern",
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "string", "pattern": "^(a{0,1000}){0,1000}$"},
                },
            }
        },
        "response_format",
    ),
    (
        "memory bomb",
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": _string(maxLength=10**9)},
            }
        },
        "response_format",
    ),
    (
        "enum of 40000",
        "/v1/chat/completions",
        {"tools": [_tool({"type": "string", "enum": [f"v{i}" for i in range(40000)]})]},
        "tools[0].function.parameters",
    ),
    (
        "Responses tool",
        "/v1/responses",
        {
            "input": "Hi",
            "tools": [{"type": "function", "name": "f", "parameters": _string(maxLength=30000)}],
        },
        "tools[0].parameters",  # the client's own path (Messages' errors carry no param)
    ),
    (
        "Messages tool",
        "/v1/messages",
        {"tools": [{"name": "f", "input_schema": _string(maxLength=30000)}]},
        None,
    ),
]


def _body(route: str, extra: dict) -> dict:
    if route == "/v1/responses":
        return {"model": MODEL, "max_output_tokens": 16, **extra}
    base = {"model": MODEL, "messages": USER, "max_tokens": 2}
    return {**base, **extra}


def open_stream(base: str, body: dict) -> http.client.HTTPConnection:
    """Start a streamed chat on ``base`` and read its first bytes; the caller closes it."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request(
        "POST", "/v1/chat/completions", orjson.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read1(64)
    return conn


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf) -> Iterator[dict]:
    """A router and two nodes holding Gemma, and a client chatting through them all along."""
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    chatter = None
    try:
        env = {"LLMLB_HEARTBEAT_INTERVAL_S": "0.5"}
        router = start_router(spawn, tmp_path_factory.mktemp("home"), ADMIN, env=env)
        node_key = create_key(router, ADMIN, "node")
        nodes = []
        for i in range(2):
            store = tmp_path_factory.mktemp(f"store{i}")
            place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
            nodes.append(start_node(spawn, router, node_key, store))
        for node in nodes:
            wait_until(
                lambda n=node: (model_status(n, MODEL) or {}).get("state") == "ready",
                timeout=120,
                message="the model ready",
            )
        key = create_key(router, ADMIN, "api")
        body = {"model": MODEL, "messages": USER, "max_tokens": 2}
        for node in nodes:  # load the model on each node before memory is measured
            assert call(node, "POST", "/v1/chat/completions", None, body, timeout=120).status == 200
        wait_until(
            lambda: (
                call(router, "POST", "/v1/chat/completions", key, body, timeout=60).status == 200
            ),
            timeout=60,
            message="the router serves the model",
        )
        chatter = Chatter(router, key, MODEL)
        yield {"router": router, "nodes": nodes, "key": key, "chatter": chatter}
    finally:
        if chatter is not None:
            chatter.stop()
        stop_all()


def test_a_schema_within_the_budget_is_served_and_its_answer_fits(fleet):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = _body(
        "/v1/chat/completions",
        {
            "max_tokens": 24,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema},
            },
        },
    )
    reply = call(fleet["router"], "POST", "/v1/chat/completions", fleet["key"], body, timeout=120)
    assert reply.status == 200, reply.body
    assert reply.json["choices"][0]["message"]["content"].lstrip().startswith("{")


def test_every_poison_schema_is_a_400_in_its_routes_shape_and_harms_no_one(fleet):
    router, key, nodes = fleet["router"], fleet["key"], fleet["nodes"]
    rss_before = [rss_mib(node.proc.pid) for node in nodes]
    for what, route, extra, param in POISON:
        for streaming in (False, True):
            body = _body(route, {**extra, "stream": streaming})
            started = time.monotonic()
            reply = call(router, "POST", route, key, body, timeout=HANG_BOUND_S)
            took = time.monotonic() - started
            assert reply.status == 400, (what, streaming, reply.status, reply.body)
            assert took < HANG_BOUND_S, (what, took)
            if route == "/v1/messages":
                assert reply.json["type"] == "error", reply.body
                assert reply.json["error"]["type"] == "invalid_request_error", reply.body
            else:
                error = reply.json["error"]
                assert error["type"] == "invalid_request_error", (what, reply.body)
                if param is not None:
                    assert error["param"] == param, (what, reply.body)
            assert "grammar" in reply.body.decode(), (what, reply.body)
    for node, before in zip(nodes, rss_before, strict=True):
        assert node.proc.alive()
        assert call(node, "GET", "/health", timeout=5).status == 200
        assert rss_mib(node.proc.pid) - before < 200, (before, rss_mib(node.proc.pid))
    fleet["chatter"].check()
    assert len(fleet["chatter"].statuses) >= 3


def test_sending_the_same_poison_again_is_answered_from_the_cache(fleet):
    route, extra = POISON[0][1], POISON[0][2]
    node = fleet["nodes"][0]
    for _ in range(5):
        reply = call(node, "POST", route, None, _body(route, extra), timeout=HANG_BOUND_S)
        assert reply.status == 400
    assert node.proc.alive()
    fleet["chatter"].check()


def test_sigterm_ends_a_node_with_answers_and_grammars_in_flight(fleet):
    """Last in this module: it stops one of the fleet's nodes."""
    node = fleet["nodes"][1]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    streams = []
    for i in range(4):
        body = _body("/v1/chat/completions", {"max_tokens": 400, "stream": True})
        if i % 2:
            spec = {"name": "x", "schema": schema}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        streams.append(open_stream(node, body))
    tree = {node.proc.pid, *descendants(node.proc.pid)}
    assert len(tree) >= 3  # the node, its worker and a grammar compiler at least
    started = time.monotonic()
    os.kill(node.proc.pid, signal.SIGTERM)
    wait_until(
        lambda: all(gone(pid) for pid in tree),
        timeout=SIGTERM_BOUND_S,
        message="the node and all its processes gone",
    )
    took = time.monotonic() - started
    for stream in streams:
        stream.close()
    print(f"SIGTERM with 4 streams in flight: every process gone in {took:.2f}s")
