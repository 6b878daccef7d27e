"""Bounded parsing with real processes: JSON nesting beyond 64 levels, shapes where an object
belongs that are not one, JSON strings nested 1,000 levels, NUL characters on the router's
control plane (SQLite and PostgreSQL alike), and Range headers and encoded ids on a node's
peer route. Each is a 400 (416, 404) in the route's own error shape, never a 500, through a
router with two nodes serving the real Gemma model, while a client keeps chatting unharmed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.factories import write_gguf
from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, model_status, place_model, start_node
from tests.peer_fixtures import FakePeer
from tests.proc_tree import rss_mib
from tests.procs import spawner, wait_until
from tests.router_fixtures import RouterUrl, call, start_router

ADMIN = "sk-admin-bounded-parsing-0123"
MODEL = "local/gemma-bounded"
TINY = "acme/tiny"  # a registered GGUF the nodes download: served on the peer route
TINY_FILE = "tiny-Q4_K_M.gguf"
USER = [{"role": "user", "content": "Hi"}]
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")


def nested(depth: int) -> object:
    """A value whose containers nest ``depth`` levels (objects and arrays, alternating)."""
    value: object = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def raw_nested(depth: int) -> bytes:
    """JSON nested ``depth`` arrays deep, written out (orjson cannot write 255+ levels)."""
    return b"[" * depth + b"]" * depth


def body_for(route: str) -> dict:
    """A minimal valid body for ``route``."""
    if route == "/v1/completions":
        return {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    if route == "/v1/embeddings":
        return {"model": MODEL, "input": "Hi"}
    if route == "/v1/responses":
        return {"model": MODEL, "input": "Hi", "max_output_tokens": 16}
    if route in ANTHROPIC_ROUTES:
        return {"model": MODEL, "messages": USER, "max_tokens": 2}
    return {"model": MODEL, "messages": USER, "max_tokens": 2}


def with_deep_field(route: str, depth: int) -> bytes:
    """``route``'s body with a ``metadata``-like field nested ``depth`` levels (the body's own
    object is one more)."""
    body = orjson.dumps(body_for(route))
    return body[:-1] + b', "deep": ' + raw_nested(depth) + b"}"


def assert_400(reply, route: str, param: str | None = None) -> None:
    """A 400 in ``route``'s error shape (naming ``param`` on the OpenAI routes when given)."""
    assert reply.status == 400, (route, reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    if route in ANTHROPIC_ROUTES:
        assert reply.json["type"] == "error", reply.body
        assert reply.json["error"]["type"] == "invalid_request_error"
        if param is not None:
            assert param in reply.json["error"]["message"]
    else:
        error = reply.json["error"]
        assert error["type"] == "invalid_request_error" and error["message"], reply.body
        if param is not None:
            assert error["param"] == param, reply.body


class Chatter:
    """A client chatting through the router the whole time; every answer must be a 200."""

    def __init__(self, router: str, key: str, model: str = MODEL) -> None:
        self.router, self.key, self.model = router, key, model
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = {"model": self.model, "messages": USER, "max_tokens": 2}
        while not self._stop.wait(0.2):  # pacing of the load, not synchronisation
            reply = call(self.router, "POST", "/v1/chat/completions", self.key, body, timeout=60)
            self.statuses.append(reply.status)

    def check(self) -> None:
        assert self.statuses and set(self.statuses) == {200}, self.statuses

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(70)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf) -> Iterator[dict]:
    """A router, the hub stand-in (holding a tiny GGUF) and two nodes holding Gemma, and a
    client chatting through it all along."""
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    chatter = None
    try:
        hub_root = tmp_path_factory.mktemp("hub")
        tiny = write_gguf(tmp_path_factory.mktemp("tiny") / TINY_FILE, file_type="Q4_K_M")
        make_repo(hub_root, TINY, {TINY_FILE: tiny})
        hub = start_hub(spawn, hub_root)
        env = {"HF_ENDPOINT": hub, "LLMLB_HEARTBEAT_INTERVAL_S": "0.5"}
        router = start_router(spawn, tmp_path_factory.mktemp("home"), ADMIN, env=env)
        node_key = create_key(router, ADMIN, "node")
        nodes = []
        for i in range(2):
            store = tmp_path_factory.mktemp(f"store{i}")
            place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
            nodes.append(
                start_node(spawn, router, node_key, store, "--store-all", env={"HF_ENDPOINT": hub})
            )
        reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": TINY})
        assert reply.status == 201, reply.body
        for node in nodes:
            for model in (MODEL, TINY):
                wait_until(
                    lambda n=node, m=model: (model_status(n, m) or {}).get("state") == "ready",
                    timeout=120,
                    message=f"{model} ready",
                )
        key = create_key(router, ADMIN, "api")
        body = {"model": MODEL, "messages": USER, "max_tokens": 2}
        wait_until(
            lambda: (
                call(router, "POST", "/v1/chat/completions", key, body, timeout=60).status == 200
            ),
            timeout=60,
            message="the router serves the model",
        )
        for node in nodes:  # every node loads the model (and its embedding context) first
            for route in ("/v1/chat/completions", "/v1/embeddings"):
                reply = call(node, "POST", route, None, body_for(route), timeout=120)
                assert reply.status == 200, reply.body
        with FakePeer(router, node_key, {}, {}) as fake:  # a registered node gets the token
            peer_token = fake.peer_token
        chatter = Chatter(router, key)
        yield {
            "rss": [rss_mib(node.proc.pid) for node in nodes],
            "router": router,
            "nodes": nodes,
            "key": key,
            "peer_token": peer_token,
            "tiny": tiny,
            "chatter": chatter,
        }
    finally:
        if chatter is not None:
            chatter.stop()
        stop_all()


def both_ways(fleet: dict) -> list[tuple[str, str | None]]:
    """Where to send a request: through the router (with the api key), and to a node itself
    (its routes take the same bodies, whoever sends them)."""
    return [(fleet["router"], fleet["key"]), (fleet["nodes"][0], None)]


def send(base: str, key: str | None, route: str, raw: bytes):
    headers = {"Content-Type": "application/json"}
    return call(base, "POST", route, key, raw=raw, headers=headers, timeout=60)


def test_json_nested_beyond_64_levels_is_400_on_every_inference_route(fleet):
    for base, key in both_ways(fleet):
        for route in OPENAI_ROUTES + ANTHROPIC_ROUTES:
            # 65 levels in all; 300 (past orjson's 255 for writing); 2,000 (past its 1,024
            # for reading, which is malformed JSON to it).
            for depth in (64, 299, 1999):
                assert_400(send(base, key, route, with_deep_field(route, depth)), route)
            ok = send(base, key, route, with_deep_field(route, 62))  # 63 levels: not refused
            assert ok.status != 500 and b"levels deep" not in ok.body, (route, ok.body[:300])
    fleet["chatter"].check()


def test_responses_with_a_field_nested_255_levels_is_400_streaming_or_not(fleet):
    for base, key in both_ways(fleet):
        for stream in (False, True):
            body = {"model": MODEL, "input": "Hi", "stream": stream, "metadata": {}}
            raw = orjson.dumps(body)[:-1] + b', "text": {"format": ' + raw_nested(256) + b"}}"
            assert_400(send(base, key, "/v1/responses", raw), "/v1/responses")
    fleet["chatter"].check()


def test_anthropic_tool_use_input_nested_260_levels_is_400(fleet):
    deep_input = b'{"a": ' + raw_nested(259) + b"}"
    for base, key in both_ways(fleet):
        for route in ANTHROPIC_ROUTES:
            history = (
                b'[{"role": "user", "content": "weather?"}, {"role": "assistant", "content": '
                b'[{"type": "tool_use", "id": "t1", "name": "f", "input": ' + deep_input + b"}]}]"
            )
            raw = (
                b'{"model": "'
                + MODEL.encode()
                + b'", "max_tokens": 2, "messages": '
                + history
                + b"}"
            )
            assert_400(send(base, key, route, raw), route)
    fleet["chatter"].check()


def test_chat_history_tool_call_arguments_nested_1000_levels_are_400_naming_them(fleet):
    arguments = '{"a": ' + "[" * 1000 + "]" * 1000 + "}"  # a JSON string: the body is shallow
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    for base, key in both_ways(fleet):
        reply = send(base, key, "/v1/chat/completions", orjson.dumps(body))
        assert_400(reply, "/v1/chat/completions", "messages[1].tool_calls[0].function.arguments")
    fleet["chatter"].check()


@pytest.mark.parametrize("function", ["f", ["f"], 5])
def test_chat_tool_choice_function_that_is_not_an_object_is_400(fleet, function):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {
        "model": MODEL,
        "messages": USER,
        "max_tokens": 2,
        "tools": [tool],
        "tool_choice": {"type": "function", "function": function},
    }
    for base, key in both_ways(fleet):
        reply = send(base, key, "/v1/chat/completions", orjson.dumps(body))
        assert_400(reply, "/v1/chat/completions", "tool_choice.function")
    fleet["chatter"].check()


def _peer(node: str, model: str, filename: str, token: str, range_: str | None = None):
    path = f"/v0/peer/files/{quote(model, safe='')}/{quote(filename)}"
    return call(node, "GET", path, token, headers={"Range": range_} if range_ else None)


def test_peer_route_ranges_of_any_length_and_encoded_ids(fleet):
    node, token = fleet["nodes"][0], fleet["peer_token"]
    data = Path(fleet["tiny"]).read_bytes()
    size = len(data)
    huge = "9" * 4300  # past Python's 4,300-digit limit of int()
    for range_ in (f"bytes={huge}-", f"bytes={huge}-{huge}", f"bytes={size}-"):
        reply = _peer(node, TINY, TINY_FILE, token, range_)
        assert reply.status == 416, (range_[:40], reply.status, reply.body[:200])
        assert reply.json["error"]["code"] == "range_not_satisfiable"
        assert reply.headers["content-range"] == f"bytes */{size}"
    reply = _peer(node, TINY, TINY_FILE, token, f"bytes=10-{huge}")  # to the end
    assert reply.status == 206 and reply.body == data[10:]
    reply = _peer(node, TINY, TINY_FILE, token, f"bytes=-{huge}")  # the whole file
    assert reply.status == 206 and reply.body == data
    reply = _peer(node, TINY, TINY_FILE, token, "bytes=" + "0" * 4000 + "4-7")  # still 4-7
    assert reply.status == 206 and reply.body == data[4:8]
    for malformed in ("bytes=1-2,4-5", "lines=1-2", "bytes=x-y"):  # ignored: the whole file
        reply = _peer(node, TINY, TINY_FILE, token, malformed)
        assert reply.status == 200 and reply.body == data
    # An id the router has no manifest for (a quantisation suffix, a hand-placed model).
    for model, filename in ((f"{TINY}:q4_k_m", TINY_FILE), (MODEL, "x.gguf")):
        reply = _peer(fleet["nodes"][0], model, filename, token)
        assert reply.status == 404, (model, reply.status, reply.body)
        assert reply.json["error"]["code"] == "model_not_found"
    fleet["chatter"].check()


def test_every_node_is_alive_and_the_chatting_client_saw_no_failure(fleet):
    # At least three answers: on a busy machine the module's tests can end before the
    # client got them, so wait for them (each a 2-token answer; 60 s allows a slow one).
    chatter = fleet["chatter"]
    wait_until(lambda: len(chatter.statuses) >= 3, timeout=60, message="three answers")
    chatter.check()
    for node, before in zip(fleet["nodes"], fleet["rss"], strict=True):
        assert node.proc.alive()
        assert call(node, "GET", "/health").status == 200
        assert rss_mib(node.proc.pid) - before < 200


# -- the control plane, on both backends ------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def control(request, tmp_path_factory) -> Iterator[RouterUrl]:
    """A router on each backend in turn (no nodes: only its control routes are used)."""
    spawn, stop_all = spawner(tmp_path_factory.mktemp("control"))
    try:
        args: tuple[str, ...] = ()
        if request.param == "postgresql":
            args = ("--db", request.getfixturevalue("postgres_server").create_database())
        yield start_router(spawn, tmp_path_factory.mktemp("home"), ADMIN, *args)
    finally:
        stop_all()


def test_nul_characters_on_the_control_plane_are_400_on_both_backends(control):
    node = {"node_id": "n-nul", "url": "http://127.0.0.1:9", "slots": 1, "models": []}
    cases = [
        ("/v0/keys", {"scope": "api", "name": "bad\x00name"}),
        ("/v0/keys", {"scope": "api", "name": "ok", "bad\x00key": 1}),
        ("/v0/nodes", {**node, "url": "http://127.0.0.1:9/\x00"}),
        ("/v0/nodes", {**node, "models": [{"id": "a/b", "state": "failed", "error": "\x00"}]}),
        ("/v1/models/register", {"repo": "acme/tiny", "chat_template": "{{ x }}\x00"}),
        ("/v0/peers/report", {"model_id": "a/b", "node_id": "n1", "reason": "bad\x00"}),
    ]
    for path, body in cases:
        reply = call(control, "POST", path, ADMIN, body)
        assert reply.status == 400, (path, reply.status, reply.body)
        assert reply.json["error"]["code"] == "invalid_request_error"
        assert "NUL" in reply.json["error"]["message"]
    # A heartbeat of a registered node.
    assert call(control, "POST", "/v0/nodes", ADMIN, node).status in (200, 201)
    beat = {"slots": 1, "models": [{"id": "a/b", "state": "failed", "error": "x\x00"}]}
    reply = call(control, "POST", "/v0/nodes/n-nul/heartbeat", ADMIN, beat)
    assert reply.status == 400 and "NUL" in reply.json["error"]["message"], reply.body
    # Path parameters: a key id, a node id, a model id.
    assert call(control, "DELETE", "/v0/keys/abc%00def", ADMIN).status == 404
    assert call(control, "DELETE", "/v0/nodes/n%00x", ADMIN).status == 400
    assert call(control, "GET", "/v1/models/a%2Fb%00c", ADMIN).status == 400
    # A backslash before u0000 is no NUL: the text stays as it is.
    reply = call(control, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "a\\u0000b"})
    assert reply.status == 201 and reply.json["name"] == "a\\u0000b"
    assert call(control, "GET", "/health").status == 200


def test_json_nested_beyond_64_levels_is_400_on_control_routes(control):
    for path in ("/v0/keys", "/v0/nodes", "/v1/models/register", "/v0/peers/report"):
        raw = b'{"scope": "api", "x": ' + raw_nested(64) + b"}"
        reply = call(control, "POST", path, ADMIN, raw=raw)
        assert reply.status == 400, (path, reply.body)
        assert "64 levels" in reply.json["error"]["message"]
    # 63 levels parse: what is refused then is the unknown field, not the depth.
    raw = b'{"scope": "api", "name": "deep-ok", "x": ' + raw_nested(63) + b"}"
    reply = call(control, "POST", "/v0/keys", ADMIN, raw=raw)
    assert reply.status == 400 and reply.json["error"]["code"] == "unknown_field", reply.body
    assert "64 levels" not in reply.json["error"]["message"]
    # The proxy refuses before looking for a model or a node, in the route's shape.
    deep = b'{"model": "a/b", "x": ' + raw_nested(300) + b"}"
    key = create_key(control, ADMIN, "api")
    for route in OPENAI_ROUTES + ANTHROPIC_ROUTES:
        assert_400(send(control, key, route, deep), route)
