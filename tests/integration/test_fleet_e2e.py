"""The whole fleet end to end: hub stand-in serving the real Gemma GGUF, a router, two nodes,
and the official ``openai`` package talking to the router; then a node is SIGKILLed with
requests in flight, taken offline, restarted, and rejoins."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE
from openai import OpenAI

from tests.hub_fixtures import make_repo, start_hub
from tests.node_fixtures import create_key, start_node
from tests.procs import spawner, wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-fleet-e2e"
REPO = "google/gemma-3-270m-it-gguf"
HEARTBEAT_S = 0.5
OFFLINE_BOUND_S = 10.0  # 3 missed heartbeats (1.5 s) plus reaping and slack on a busy machine


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf):
    """Hub, router and two nodes, with Gemma registered and ready on both."""
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        root = tmp_path_factory.mktemp("hub")
        make_repo(root, REPO, {gemma_gguf.name: gemma_gguf})
        hub = start_hub(spawn, root)
        router_env = {
            "HF_ENDPOINT": hub,
            "LLMLB_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "LLMLB_PROXY_COOLDOWN_S": "1",
        }
        router = start_router(spawn, tmp_path_factory.mktemp("home"), ADMIN, env=router_env)
        node_key = create_key(router, ADMIN, "node")
        nodes = []
        for index in range(2):
            store = tmp_path_factory.mktemp(f"store{index}")
            nodes.append(start_node(spawn, router, node_key, store, env={"HF_ENDPOINT": hub}))
        reply = call(
            router,
            "POST",
            "/v1/models/register",
            ADMIN,
            {"repo": REPO, "chat_template": GEMMA_CHAT_TEMPLATE},
        )
        assert reply.status == 201, reply.body
        model = reply.json["id"]
        wait_until(
            lambda: nodes_ready(router, model) == 2,
            timeout=180,
            message="the model ready on both nodes",
        )
        ids = {entry["url"]: entry["node_id"] for entry in node_list(router)}
        yield {
            "router": router,
            "model": model,
            "nodes": nodes,
            "ids": [ids[str(node)] for node in nodes],
            "node_key": node_key,
            "hub": hub,
            "spawn": spawn,
            "client": OpenAI(
                base_url=f"{router}/v1",
                api_key=create_key(router, ADMIN, "api"),
                max_retries=0,
                timeout=120,
            ),
        }
    finally:
        stop_all()


def node_list(router: str) -> list[dict]:
    reply = call(router, "GET", "/v0/nodes", ADMIN)
    assert reply.status == 200, reply.body
    return reply.json["nodes"]


def nodes_ready(router: str, model: str) -> int:
    reply = call(router, "GET", f"/v1/models/{model}", ADMIN)
    return reply.json.get("nodes_ready", 0) if reply.status == 200 else 0


def outstanding(router: str, node_id: str) -> float:
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    prefix = f'llmlb_proxy_outstanding{{node="{node_id}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def watch_offline(router: str, node_id: str, since: float) -> list[float]:
    """Poll in the background; the list gets the seconds from ``since`` to ``node_id`` offline."""
    seen: list[float] = []

    def poll() -> None:
        deadline = since + 2 * OFFLINE_BOUND_S
        while time.monotonic() < deadline:
            if any(e["node_id"] == node_id and e["status"] == "offline" for e in node_list(router)):
                seen.append(time.monotonic() - since)
                return
            time.sleep(0.05)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def chat(client: OpenAI, model: str, max_tokens: int = 12) -> tuple[str, str]:
    """One non-streaming chat completion; returns (text, node that served it)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=max_tokens,
        temperature=0,
    )
    completion = raw.parse()
    return completion.choices[0].message.content, raw.headers["x-llmlb-node"]


def test_openai_sdk_through_the_router(fleet):
    client, model = fleet["client"], fleet["model"]

    text, _ = chat(client, model)
    assert text.strip()

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        stream=True,
    )
    deltas = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(deltas) > 2 and "".join(deltas).strip()

    completion = client.completions.create(model=model, prompt="The sky is", max_tokens=8)
    assert completion.choices[0].text.strip()

    embedding = client.embeddings.create(model=model, input=["hello world", "goodbye"])
    assert len(embedding.data) == 2
    vector = embedding.data[0].embedding
    assert len(vector) > 16 and any(value != 0 for value in vector)

    # Each node has one slot: concurrent requests spread over both nodes.
    with ThreadPoolExecutor(4) as pool:
        served = {node for _, node in pool.map(lambda _: chat(client, model), range(4))}
    assert served == set(fleet["ids"])


def test_killed_node_is_failed_over_taken_offline_and_rejoins(fleet):
    client, model, router = fleet["client"], fleet["model"], fleet["router"]
    victim, survivor = fleet["nodes"]
    victim_id, survivor_id = fleet["ids"]

    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(chat, client, model, 48) for _ in range(4)]
        wait_until(
            lambda: outstanding(router, victim_id) > 0,
            timeout=30,
            interval=0.01,
            message="a request in flight on the victim",
        )
        victim.proc.kill()
        offline_after = watch_offline(router, victim_id, time.monotonic())
        results = [future.result(timeout=120) for future in in_flight]
    # Nothing had reached the clients of the victim's requests: they moved to the survivor.
    assert all(text.strip() for text, _ in results)

    for _ in range(3):
        text, node = chat(client, model)
        assert text.strip() and node == survivor_id

    wait_until(lambda: offline_after, timeout=OFFLINE_BOUND_S, message="victim offline")
    assert offline_after[0] < OFFLINE_BOUND_S
    assert nodes_ready(router, model) == 1

    restarted = start_node(
        fleet["spawn"],
        router,
        fleet["node_key"],
        victim.models_dir,
        env={"HF_ENDPOINT": fleet["hub"]},
        port=victim.port,
    )
    fleet["nodes"][0] = restarted
    wait_until(lambda: nodes_ready(router, model) == 2, timeout=60, message="victim back")
    assert {entry["node_id"] for entry in node_list(router)} == {victim_id, survivor_id}

    def victim_serves() -> bool:
        with ThreadPoolExecutor(2) as pool:
            served = {node for _, node in pool.map(lambda _: chat(client, model, 4), range(2))}
        return victim_id in served

    wait_until(victim_serves, timeout=60, interval=0.2, message="traffic on the rejoined node")
