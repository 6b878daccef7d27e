"""A real hub stand-in, router and node: a registered model is downloaded and served."""

from __future__ import annotations

import re

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import (
    create_key,
    model_status,
    place_model,
    sse_events,
    start_node,
)
from tests.procs import spawner, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-node-serving"
REPO = "google/gemma-3-270m-it-gguf"
HAND = "local/gemma-hand"
NO_TEMPLATE = "local/gemma-raw"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf):
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        root = tmp_path_factory.mktemp("hub")
        make_repo(root, REPO, {gemma_gguf.name: gemma_gguf})
        hub_log = tmp_path_factory.mktemp("logs") / "hub.jsonl"
        hub = start_hub(spawn, root, "--log-requests", str(hub_log))
        router = start_router(
            spawn, tmp_path_factory.mktemp("home"), ADMIN, env={"HF_ENDPOINT": hub}
        )
        node_key = create_key(router, ADMIN, "node")
        store = tmp_path_factory.mktemp("store")
        place_model(store, HAND, gemma_gguf, GEMMA_CHAT_TEMPLATE)
        place_model(store, NO_TEMPLATE, gemma_gguf)
        node = start_node(spawn, router, node_key, store, env={"HF_ENDPOINT": hub})
        reply = call(
            router,
            "POST",
            "/v1/models/register",
            ADMIN,
            {"repo": REPO, "chat_template": GEMMA_CHAT_TEMPLATE},
        )
        assert reply.status == 201, reply.body
        model_id = reply.json["id"]
        try:
            wait_until(
                lambda: (model_status(node, model_id) or {}).get("state") in ("ready", "failed"),
                timeout=120,
                message="registered model ready on the node",
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{node.proc.log()}") from None
        assert model_status(node, model_id)["state"] == "ready", node.proc.log()
        yield {
            "hub": hub,
            "hub_log": hub_log,
            "router": router,
            "node": node,
            "model": model_id,
            "store": store,
        }
    finally:
        stop_all()


def _hub_requests(log) -> list[dict]:
    return [orjson.loads(line) for line in log.read_bytes().splitlines() if line.strip()]


def _chat(node, model, stream=False, **extra):
    body = {
        "model": model,
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        **extra,
    }
    return call(node, "POST", "/v1/chat/completions", body=body, timeout=120)


def test_registered_model_is_downloaded_verified_and_answers_chat(fleet):
    model_dir = fleet["store"] / fleet["model"]
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "chat_template.jinja",
        "gemma-3-270m-it-Q4_K_M.gguf",
    ]
    assert not (fleet["store"] / ".staging" / fleet["model"]).exists()
    reply = _chat(fleet["node"], fleet["model"])
    assert reply.status == 200, reply.body
    text = reply.json["choices"][0]["message"]["content"]
    # the demo model is the base (not instruction-tuned) Gemma: real words, not an answer
    assert re.search(r"[A-Za-z]{3,}", text), text
    assert reply.json["model"] == fleet["model"]
    assert reply.json["usage"]["completion_tokens"] > 0


def test_streaming_chat_sends_tokens_one_event_at_a_time(fleet):
    reply = _chat(
        fleet["node"], fleet["model"], stream=True, stream_options={"include_usage": True}
    )
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.body.rstrip().endswith(b"data: [DONE]")
    events = sse_events(reply.body)
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert len([p for p in pieces if p]) >= 3
    # greedy decoding: the stream carries exactly the text the non-streaming call returns
    whole = _chat(fleet["node"], fleet["model"]).json["choices"][0]["message"]["content"]
    assert "".join(pieces) == whole
    assert events[-1]["usage"]["completion_tokens"] >= 3


def test_completions_and_embeddings_answer(fleet):
    reply = call(
        fleet["node"],
        "POST",
        "/v1/completions",
        timeout=120,
        body={
            "model": fleet["model"],
            "prompt": "Paris is the capital of",
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert reply.status == 200, reply.body
    assert "France" in reply.json["choices"][0]["text"]
    reply = call(
        fleet["node"],
        "POST",
        "/v1/embeddings",
        timeout=120,
        body={"model": fleet["model"], "input": ["hello world", "bonjour le monde"]},
    )
    assert reply.status == 200, reply.body
    vectors = [d["embedding"] for d in reply.json["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == 640
    assert vectors[0] != vectors[1] and any(abs(x) > 1e-6 for x in vectors[0])


def test_hand_placed_model_is_served_without_any_download(fleet):
    reply = _chat(fleet["node"], HAND)
    assert reply.status == 200, reply.body
    assert re.search(r"[A-Za-z]{3,}", reply.json["choices"][0]["message"]["content"])
    requests = _hub_requests(fleet["hub_log"])
    assert not [r for r in requests if "gemma-hand" in r["path"]]
    downloads = [r for r in requests if "/resolve/" in r["path"] and r["method"] == "GET"]
    assert downloads and all(r["repo"] == REPO for r in downloads)
    listed = call(fleet["node"], "GET", "/v1/models").json["data"]
    assert {HAND, NO_TEMPLATE, fleet["model"]} <= {m["id"] for m in listed}


def test_chat_without_any_template_is_a_clear_400(fleet):
    reply = _chat(fleet["node"], NO_TEMPLATE)
    assert reply.status == 400
    assert reply.json["error"]["code"] == "chat_template_missing"
    reply = call(
        fleet["node"],
        "POST",
        "/v1/completions",
        timeout=120,
        body={"model": NO_TEMPLATE, "prompt": "Hello", "max_tokens": 2},
    )
    assert reply.status == 200


def test_unknown_model_bad_body_and_sync_auth(fleet):
    reply = _chat(fleet["node"], "nobody/nothing")
    assert reply.status == 404 and reply.json["error"]["code"] == "model_not_found"
    reply = call(fleet["node"], "POST", "/v1/chat/completions", raw=b"{nope")
    assert reply.status == 400 and reply.json["error"]["type"] == "invalid_request_error"
    reply = call(
        fleet["node"],
        "POST",
        "/api/models/sync",
        key="wrong",
        body={"models": [fleet["model"]], "action": "register"},
    )
    assert reply.status == 401 and reply.json["error"]["code"] == "invalid_api_key"


def test_metrics_count_downloads_requests_and_tokens(fleet):
    text = call(fleet["node"], "GET", "/metrics").body.decode()
    assert 'llmlb_node_downloads_total{result="ok"} 1.0' in text
    assert "llmlb_node_download_bytes_total 2.53113024e+08" in text
    assert 'llmlb_node_requests_total{route="chat",status="200"}' in text
    assert 'llmlb_node_tokens_total{kind="completion"}' in text
    assert "llmlb_node_model_load_seconds_count" in text
