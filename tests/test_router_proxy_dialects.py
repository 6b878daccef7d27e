"""The inference proxy on ``/v1/responses`` and Anthropic's ``/v1/messages*``: forwarded and
failed over like the OpenAI routes, the router's own errors in Anthropic's shape on the
Anthropic routes (driven in-process over ASGI against the real mock backend process)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from llmlb.router.control.fleet import FleetView

from tests.test_router_proxy import MODEL, call, dead_url, load, node, running, start_mock

MESSAGES = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
PATHS = ["/v1/responses", "/v1/messages", "/v1/messages/count_tokens"]


@pytest.fixture(scope="module")
def mock(tmp_path_factory) -> str:
    """Base URL of a mock backend shared by the module's tests."""
    proc, base = start_mock(tmp_path_factory.mktemp("mock") / "mock.log")
    yield base
    proc.stop()


@pytest.mark.parametrize("path", PATHS)
def test_new_routes_fail_over_before_any_byte(mock, path):
    async def scenario() -> None:
        fleet = FleetView()
        load(
            fleet,
            node("bad", f"{mock}/_mock/bad{PATHS.index(path)}/fail500"),
            node("good", f"{mock}/_mock/g/ok"),
        )
        async with running(fleet, failure_threshold=5) as proxy:
            results = [await call(proxy, {**MESSAGES, "seed": i}, path=path) for i in range(4)]
            assert [r.status for r in results] == [200] * 4
            assert {r.headers["x-llmlb-node"] for r in results} == {"good"}

    asyncio.run(scenario())


def test_router_errors_on_messages_routes_are_anthropic_shaped(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("d1", dead_url()))
        async with running(fleet) as proxy:
            res = await call(proxy, MESSAGES, path="/v1/messages")
            assert res.status == 502
            body = res.json()
            assert body["type"] == "error" and body["error"]["type"] == "api_error"
            assert "d1" in body["error"]["message"]
            assert int(res.headers["content-length"]) == len(res.body)
            res = await call(proxy, {**MESSAGES, "model": "org/other"}, path="/v1/messages")
            assert res.status == 404
            assert res.json() == {
                "type": "error",
                "error": {
                    "type": "not_found_error",
                    "message": "model 'org/other' not found",
                },
            }
            res = await call(proxy, b"{not json", path="/v1/messages/count_tokens")
            assert res.status == 400 and res.json()["error"]["type"] == "invalid_request_error"
            # The OpenAI dialects keep the OpenAI shape.
            res = await call(proxy, b"{not json", path="/v1/responses")
            assert res.status == 400 and res.json()["error"]["code"] == "invalid_request_error"

    asyncio.run(scenario())


def test_failure_mid_stream_ends_with_the_dialects_error_event(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("b1", f"{mock}/_mock/b1/break"))
        async with running(fleet) as proxy:
            res = await call(proxy, {**MESSAGES, "stream": True}, path="/v1/messages")
            assert res.status == 200
            tail = res.body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert tail.startswith(b"event: error\ndata: ")
            error = orjson.loads(tail.split(b"data: ", 1)[1])
            assert error["type"] == "error" and error["error"]["type"] == "api_error"
            assert "b1" in error["error"]["message"]
            res = await call(proxy, {**MESSAGES, "stream": True}, path="/v1/responses")
            assert orjson.loads(res.events()[-1])["error"]["code"] == "upstream_error"

    asyncio.run(scenario())
