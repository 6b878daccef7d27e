"""Prefix-aware routing end to end: a real router and two real nodes with the real model.

A conversation's second turn, sent without any header, reaches the node that served its
first turn and is answered from that node's cache; after the router restarts (its index
empty) the nodes' snapshots bring it back to routing by prefix with no traffic in between.
"""

from __future__ import annotations

from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.node_fixtures import create_key, model_status, place_model, start_node
from tests.procs import LLMLB, free_port, wait_until
from tests.router_fixtures import RouterUrl, call

ADMIN = "sk-test-admin-prefix-e2e"
MODEL = "local/gemma-prefix"
CHAT = "/v1/chat/completions"
ENV = {
    "LLMLB_ADMIN_KEY": ADMIN,
    "LLMLB_NODE_APPROVAL": "auto",
    "LLMLB_HEARTBEAT_INTERVAL_S": "0.5",
}


def router_on(spawn, home, port: int) -> RouterUrl:
    """``llmlb router`` on a fixed port (so that nodes find it again after a restart)."""
    argv = [*LLMLB, "router", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(argv, env={"LLMLB_HOME": str(home), **ENV}, name="router")
    url = RouterUrl(f"http://127.0.0.1:{port}")
    proc.wait_http(f"{url}/health", timeout=60)
    url.proc = proc
    url.home = home
    return url


def conversation(tag: str, *turns: str) -> dict:
    system = f"You are the {tag} assistant of a fleet operator. Answer in one short sentence. "
    messages = [{"role": "system", "content": system * 12}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}


def ask(router: str, key: str, body: dict) -> tuple[str, str, dict]:
    """(node, answer text, usage) of one request through the router."""
    reply = call(router, "POST", CHAT, key, body, timeout=180)
    assert reply.status == 200, reply.body
    return (
        reply.headers["x-llmlb-node"],
        reply.json["choices"][0]["message"]["content"],
        reply.json["usage"],
    )


def routed(router: str, reason: str) -> float:
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    line = f'llmlb_proxy_routing_total{{model="{MODEL}",reason="{reason}"}} '
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))


def counted(router: str, name: str, node: str) -> float:
    """A ``{model,node}`` counter of the router's proxy for ``node``."""
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    line = f'llmlb_proxy_{name}_total{{model="{MODEL}",node="{node}"}} '
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))


def test_the_next_turn_finds_its_node_and_a_restarted_router_learns_from_snapshots(
    spawn, tmp_path, gemma_gguf
):
    port = free_port()
    router = router_on(spawn, tmp_path / "home", port)
    node_key = create_key(router, ADMIN, "node")
    api_key = create_key(router, ADMIN, "api")
    nodes = []
    for name in ("one", "two"):
        store = tmp_path / name
        place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
        nodes.append(start_node(spawn, router, node_key, store, "--threads", "1"))
    for node in nodes:
        wait_until(lambda n=node: (model_status(n, MODEL) or {}).get("state") == "ready", 120)

    def ready() -> bool:
        reply = call(router, "GET", f"/v1/models/{MODEL}", api_key)
        return reply.status == 200 and reply.json["nodes_ready"] == 2

    wait_until(ready, timeout=30, message="both nodes ready")

    # Turn 1 lands anywhere; turn 2, without any header, goes where turn 1 is cached.
    first = conversation("north", "Name a colour.")
    home, said, usage = ask(router, api_key, first)
    second = conversation("north", "Name a colour.", said, "And another one?")
    node, said_again, usage2 = ask(router, api_key, second)
    assert node == home
    assert usage2["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"]
    assert routed(router, "prefix") == 1

    # What the node reported it took from its cache is counted beside what the index
    # predicted, and the Traffic view shows both shares.
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in (usage, usage2)]
    assert counted(router, "reported_cached_tokens", home) == sum(cached)
    assert counted(router, "reported_prompt_tokens", home) == (
        usage["prompt_tokens"] + usage2["prompt_tokens"]
    )
    assert counted(router, "predicted_cached_chars", home) > 0

    def traffic_row() -> dict | None:
        nodes = call(router, "GET", "/v0/traffic", ADMIN).json["routing"]["nodes"]
        row = nodes.get(home, {}).get(MODEL)
        return row if row and row["reported_cached_tokens"] == sum(cached) else None

    row = wait_until(traffic_row, timeout=30, message="the Traffic view's cache row")
    assert row["reported_prompt_tokens"] == usage["prompt_tokens"] + usage2["prompt_tokens"]
    assert 0 < row["predicted_cached_chars"] <= row["prompt_chars"]

    # Every node reports what it holds: wait until this router has both nodes' keys.
    def indexed() -> bool:
        index = call(router, "GET", "/v0/traffic", ADMIN).json["routing"]["index"]
        return all(index.get(n, {}).get("epoch") for n in (home,))

    wait_until(indexed, timeout=10, message="the node's snapshot")

    # The router restarts: its index is empty until the nodes' snapshots arrive, which
    # needs no client traffic; then the conversation's third turn goes home again.
    router.proc.stop()
    router = router_on(spawn, tmp_path / "home", port)
    wait_until(ready, timeout=30, message="both nodes back")
    wait_until(indexed, timeout=10, message="snapshots after the restart")
    third = conversation(
        "north", "Name a colour.", said, "And another one?", said_again, "A third?"
    )
    node, _, usage3 = ask(router, api_key, third)
    assert node == home
    assert usage3["prompt_tokens_details"]["cached_tokens"] >= usage2["prompt_tokens"]
    assert routed(router, "prefix") == 1 and routed(router, "fallback") == 0
