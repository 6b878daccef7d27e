"""A real node process with the real Gemma: OpenAI fields validated, bounded and cancellable."""

from __future__ import annotations

import socket
import time

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.node_fixtures import place_model, start_node
from tests.procs import spawner, wait_until
from tests.router_fixtures import call

MODEL = "local/gemma"
GEMMA_EOS = 1


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_gguf):
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    store = tmp_path_factory.mktemp("store")
    place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
    try:
        yield start_node(spawn, "", None, store, "--concurrency", "2", "--max-tokens", "16")
    finally:
        stop_all()


def _chat(**extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
        **extra,
    }


def _completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **extra}


BAD_CHAT = [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 5}, "temperature"),
    ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 3}, "n"),  # more choices than the node's 2 slots
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": "many"}, "max_completion_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"messages": []}, "messages"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"store": True}, "store"),
]

BAD_COMPLETION = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"echo": "yes"}, "echo"),
    ({"logprobs": 9}, "logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),  # Gemma has no fill-in-the-middle tokens
    ({"prompt": ["a"] * 129}, "prompt"),  # one request may not fill the queue
]

BAD_EMBEDDING = [
    ({"input": 5}, "input"),
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "hi", "dimensions": 64}, "dimensions"),
]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [("/v1/chat/completions", _chat(**patch), param) for patch, param in BAD_CHAT]
    + [("/v1/completions", _completion(**patch), param) for patch, param in BAD_COMPLETION]
    + [("/v1/embeddings", {"model": MODEL, **patch}, param) for patch, param in BAD_EMBEDDING],
)
def test_bad_fields_are_400_naming_the_param(node, route, body, param):
    reply = call(node, "POST", route, body=body, timeout=60)
    assert reply.status == 400, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


def test_unknown_fields_are_ignored(node):
    reply = call(node, "POST", "/v1/chat/completions", body=_chat(litellm_trace_id="abc"),
                 timeout=60)
    assert reply.status == 200, reply.body
    assert reply.json["system_fingerprint"]


def test_too_long_prompt_is_context_length_exceeded_before_any_byte(node):
    long = "word " * 1500  # the node's slots hold 1024 tokens
    for stream in (False, True):
        reply = call(node, "POST", "/v1/completions", body=_completion(prompt=long, stream=stream),
                     timeout=60)
        assert reply.status == 400, reply.body
        assert reply.headers["content-type"].startswith("application/json")
        assert reply.json["error"]["code"] == "context_length_exceeded"


def test_a_request_without_max_tokens_is_capped_by_the_node(node):
    body = {"model": MODEL, "prompt": "Count: one, two,", "temperature": 0,
            "logit_bias": {str(GEMMA_EOS): -100}}
    reply = call(node, "POST", "/v1/completions", body=body, timeout=60)
    assert reply.status == 200, reply.body
    assert reply.json["usage"]["completion_tokens"] == 16  # --max-tokens 16
    assert reply.json["choices"][0]["finish_reason"] == "length"


def _metric(node_url: str, sample: str) -> float:
    """The value of one Prometheus sample (name with its labels) on the node."""
    text = call(node_url, "GET", "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


COMPLETION_TOKENS = 'llmlb_node_tokens_total{kind="completion"}'


def _send_and_drop(node_url: str, body: dict, until) -> None:
    """Send a request on a raw socket; close it, unread, once ``until()`` holds."""
    host, port = node_url.removeprefix("http://").split(":")
    data = orjson.dumps(body)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_until(until, timeout=60, message="the request to generate")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_generation(node, stream):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "stream": stream,
            "logit_bias": {str(GEMMA_EOS): -100}}
    before = _metric(node, COMPLETION_TOKENS)
    _send_and_drop(node, body, until=lambda: _metric(node, COMPLETION_TOKENS) >= before + 5)
    wait_until(lambda: _metric(node, "llmlb_node_active_requests") == 0, timeout=10,
               message="the dropped request to leave")
    stopped = _metric(node, COMPLETION_TOKENS)
    assert stopped - before < 1000
    # the counter no longer moves: no token is generated for the client that left
    settle = time.monotonic() + 1.0
    wait_until(lambda: time.monotonic() > settle, timeout=5)
    assert _metric(node, COMPLETION_TOKENS) == stopped
