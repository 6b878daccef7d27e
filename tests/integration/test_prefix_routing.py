"""Prefix-aware routing against real ``llmlb router`` processes: the cache reports nodes post
(``POST /v0/nodes/{id}/cache``) attract a conversation's next turn to the node holding it,
a saturated holder spills, a restarted or offline node stops attracting, a restarted router
converges from a snapshot without traffic, two routers on one PostgreSQL agree, bad reports
are refused without harm, and ``--routing p2c`` ignores the index.

Nodes are the project's mock backend (``bench/router/mock_backend.py``) behind per-node URL
prefixes; the test registers them, sends their heartbeats (:class:`Beats`) and posts their
cache reports itself, with the keys :mod:`llmlb.prefix_keys` computes, as a node does.
"""

from __future__ import annotations

import http.client
import itertools
import threading
from collections.abc import Iterator

import orjson
import pytest
from llmlb.prefix_keys import MAX_REPORT_KEYS, answer_key, request_keys
from llmlb.router.proxy.prefix_index import MAX_REPORT_BYTES

from tests.integration.test_multi_router import start_routers
from tests.integration.test_router_hardening import ADMIN, Beats, start_mock
from tests.procs import wait_until
from tests.router_fixtures import RouterUrl, call, start_router

CHAT = "/v1/chat/completions"
HEARTBEAT_S = 0.5
ENV = {"LLMLB_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S)}
_ids = itertools.count(1)


# -- conversations and reports -----------------------------------------------------------------


def system(tag: str) -> str:
    return f"[{tag}] You help the operators of a fleet of language-model nodes. " * 60


def turn(model: str, tag: str, n: int) -> dict:
    """The body of turn ``n`` (0-based) of conversation ``tag``: its system prompt, then the
    earlier questions and answers, then question ``n``."""
    messages = [{"role": "system", "content": system(tag)}]
    for i in range(n):
        messages += [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    messages.append({"role": "user", "content": f"question {n}"})
    return {"model": model, "messages": messages, "max_tokens": 4}


def held_after(model: str, tag: str, n: int) -> list[int]:
    """The keys a node holds once it answered turn ``n``: the prompt's, and the answer's as
    the client sends it back."""
    keys = request_keys(CHAT, turn(model, tag, n))
    answer = answer_key(CHAT, keys, f"answer {n}")
    assert answer is not None
    return [key for key, _ in keys] + [answer[0]]


class Reporter:
    """Posts one node's cache reports: an epoch, and ``seq`` counting up."""

    def __init__(self, node_id: str, epoch: str | None = None) -> None:
        self.node_id = node_id
        self.epoch = epoch or f"epoch-{node_id}-{next(_ids)}"
        self.seq = 0

    def post(self, router: str, body: dict):
        return call(router, "POST", f"/v0/nodes/{self.node_id}/cache", ADMIN, body)

    def snapshot(self, router: str, model: str, keys: list[int]):
        self.seq += 1
        body = {"epoch": self.epoch, "seq": self.seq, "snapshot": True, "stored": {model: keys}}
        return self.post(router, body)

    def delta(self, router: str, model: str, stored=(), removed=()):
        self.seq += 1
        body = {
            "epoch": self.epoch,
            "seq": self.seq,
            "stored": {model: list(stored)},
            "removed": {model: list(removed)},
        }
        return self.post(router, body)


def chat(router: str, key: str, body: dict, headers: dict | None = None) -> str:
    """Send ``body``; the node that answered it."""
    reply = call(router, "POST", CHAT, key, body, headers=headers)
    assert reply.status == 200, reply.body
    return reply.headers["x-llmlb-node"]


def declare_huge_body(router: str, path: str) -> tuple[int, bytes]:
    """Announce a body beyond the router's limit for cache reports (and send none of it: the
    router answers from the headers, and a real upload would race its closing the socket)."""
    host, port = router.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", f"Bearer {ADMIN}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_REPORT_BYTES + 1))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def routed(router: str, model: str, reason: str) -> float:
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    line = f'llmlb_proxy_routing_total{{model="{model}",reason="{reason}"}} '
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))


def index_of(router: str) -> dict:
    return call(router, "GET", "/v0/traffic", ADMIN).json["routing"]["index"]


def ready_on(router: str, key: str, model: str, count: int) -> None:
    def ready() -> bool:
        reply = call(router, "GET", f"/v1/models/{model}", key)
        return reply.status == 200 and reply.json["nodes_ready"] == count

    wait_until(ready, timeout=10, message=f"{model} ready on {count} nodes")


def pair(
    router: str, key: str, beats: Beats, mock: str, mode: str = "ok", slots: int = 4
) -> tuple[str, str, str]:
    """A fresh model served by two fresh nodes ``(model, a, b)``."""
    n = next(_ids)
    model, a, b = f"org/prefix-{n}", f"pa{n}", f"pb{n}"
    for node_id in (a, b):
        url = f"{mock}/_mock/{node_id}/{mode}"
        beats.register(node_id, url, [{"id": model, "state": "ready"}], slots=slots)
    ready_on(router, key, model, 2)
    return model, a, b


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.procs import spawner

    start, stop_all = spawner(tmp_path_factory.mktemp("logs"))
    yield start
    stop_all()


@pytest.fixture(scope="module")
def router(module_spawn, tmp_path_factory: pytest.TempPathFactory) -> RouterUrl:
    return start_router(module_spawn, tmp_path_factory.mktemp("home"), ADMIN, env=ENV)


@pytest.fixture(scope="module")
def api_key(router: RouterUrl) -> str:
    reply = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "prefix"})
    assert reply.status == 201
    return reply.json["key"]


@pytest.fixture(scope="module")
def beats(router: RouterUrl) -> Iterator[Beats]:
    beats = Beats(router)
    yield beats
    beats.close()


@pytest.fixture(scope="module")
def mock(module_spawn) -> str:
    return start_mock(module_spawn)[1]


# -- tests -----------------------------------------------------------------------------------


def test_reported_keys_attract_the_next_turn_without_any_header(router, api_key, beats, mock):
    model, a, b = pair(router, api_key, beats, mock)
    for holder, tag in ((a, "alpha"), (b, "beta")):
        reply = Reporter(holder).snapshot(router, model, held_after(model, tag, 0))
        assert reply.status == 202, reply.body
        assert reply.json == {
            "node_id": holder,
            "epoch": reply.json["epoch"],
            "seq": 1,
            "keys": len(held_after(model, tag, 0)),
        }
    for _ in range(5):
        assert chat(router, api_key, turn(model, "alpha", 1)) == a
        assert chat(router, api_key, turn(model, "beta", 1)) == b
    assert routed(router, model, "prefix") == 10
    # The router learnt from routing, too: turn 2 extends turn 1, which only it has seen.
    assert chat(router, api_key, turn(model, "alpha", 2)) == a
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    assert f'llmlb_proxy_predicted_cached_chars_total{{model="{model}",node="{a}"}}' in text
    summary = call(router, "GET", "/v0/traffic", ADMIN).json["routing"]
    assert summary["index"][a]["keys"] >= len(held_after(model, "alpha", 1))


def test_a_saturated_holder_spills_to_the_other_node(router, api_key, beats, mock):
    model, a, b = pair(router, api_key, beats, mock, mode="sleep800", slots=1)
    assert Reporter(a).snapshot(router, model, held_after(model, "hot", 0)).status == 202
    served: list[str] = []
    threads = [
        threading.Thread(target=lambda: served.append(chat(router, api_key, turn(model, "hot", 1))))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(served) == sorted([a, b])
    assert routed(router, model, "prefix") == 1
    assert routed(router, model, "load") == 1


def test_a_restarted_or_offline_node_stops_attracting_at_once(router, api_key, beats, mock):
    model, a, b = pair(router, api_key, beats, mock)
    node_a = Reporter(a)
    assert node_a.snapshot(router, model, held_after(model, "gamma", 0)).status == 202
    # b holds the system prompt only: once a holds nothing, b is the best place.
    assert Reporter(b).snapshot(router, model, held_after(model, "gamma", 0)[:1]).status == 202
    assert chat(router, api_key, turn(model, "gamma", 1)) == a

    # a restarted: its first delta of a new epoch is refused, and its keys are gone at once.
    restarted = Reporter(a)
    reply = restarted.delta(router, model, stored=[1, 2, 3])
    assert reply.status == 409 and reply.json["error"]["code"] == "cache_resync"
    assert chat(router, api_key, turn(model, "gamma", 1)) == b
    assert routed(router, model, "prefix") == 2
    # Deltas are refused until the snapshot; then a attracts its conversation again.
    assert restarted.delta(router, model, stored=[4]).status == 409
    assert restarted.snapshot(router, model, held_after(model, "gamma", 1)).status == 202
    assert chat(router, api_key, turn(model, "gamma", 2)) == a

    # a registers again (a new process with the same id): forgotten within a second.
    beats.register(a, f"{mock}/_mock/{a}/ok", [{"id": model, "state": "ready"}])
    wait_until(lambda: a not in index_of(router), timeout=1.0, message="a forgotten")
    assert chat(router, api_key, turn(model, "gamma", 2)) == b

    # a goes silent: offline, forgotten; back online, it attracts nothing it held before.
    assert restarted.snapshot(router, model, held_after(model, "gamma", 2)).status == 202
    assert chat(router, api_key, turn(model, "gamma", 3)) == a
    beats.stop(a)
    wait_until(lambda: a not in index_of(router), timeout=5, message="a offline and forgotten")
    beats.bodies[a] = {"slots": 64, "models": [{"id": model, "state": "ready"}]}
    ready_on(router, api_key, model, 2)
    assert chat(router, api_key, turn(model, "gamma", 3)) == b
    reply = restarted.delta(router, model, stored=[5])  # same process: asked for a snapshot
    assert reply.status == 409 and reply.json["error"]["code"] == "cache_resync"


def test_bad_or_oversized_reports_are_refused_without_harm(router, api_key, beats, mock):
    model, a, b = pair(router, api_key, beats, mock)
    assert Reporter(a).snapshot(router, model, held_after(model, "delta", 0)).status == 202
    epoch = "epoch-bad-reports"
    path = f"/v0/nodes/{b}/cache"
    bad = [
        {"epoch": "short", "seq": 1},
        {"epoch": epoch, "seq": 0},
        {"epoch": epoch, "seq": 1, "snapshot": "yes"},
        {"epoch": epoch, "seq": 1, "stored": {model: [-1]}},
        {"epoch": epoch, "seq": 1, "stored": {model: [1 << 32]}},
        {"epoch": epoch, "seq": 1, "stored": {model: "1,2,3"}},
        {"epoch": epoch, "seq": 1, "stored": {model: list(range(MAX_REPORT_KEYS + 1))}},
        {"epoch": epoch, "seq": 1, "snapshot": True, "removed": {model: [1]}},
        {"epoch": epoch, "seq": 1, "stored": {"Not A/../Model": [1]}},
        {"epoch": epoch, "seq": 1, "node_secret": 7},
    ]
    for body in bad:
        reply = call(router, "POST", path, ADMIN, body)
        assert reply.status == 400, (body, reply.body)
        assert set(reply.json["error"]) >= {"message", "type", "code"}
    for raw in (b"not json", b"[1, 2]", b"{" * 200 + b"}" * 200):
        assert call(router, "POST", path, ADMIN, raw=raw).status == 400
    status, answer = declare_huge_body(router, path)
    assert status == 413 and orjson.loads(answer)["error"]["code"] == "request_too_large"

    good = {"epoch": epoch, "seq": 1, "snapshot": True, "stored": {model: [1]}}
    assert call(router, "POST", path, api_key, good).status == 403  # not a node key
    assert call(router, "POST", path, None, good).status == 401
    reply = call(router, "POST", "/v0/nodes/nobody/cache", ADMIN, good)
    assert reply.status == 404 and reply.json["error"]["code"] == "node_not_found"
    node_key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "node"}).json["key"]
    reply = call(router, "POST", path, node_key, good)  # b is bound to another credential
    assert reply.status == 409 and reply.json["error"]["code"] == "node_id_conflict"
    assert call(router, "POST", f"/v0/nodes/{b}/revoke", ADMIN).status == 200
    wait_until(
        lambda: call(router, "POST", path, ADMIN, good).status == 403, timeout=5, message="pending"
    )
    assert call(router, "POST", path, ADMIN, good).json["error"]["code"] == "node_pending"
    assert call(router, "POST", f"/v0/nodes/{b}/approve", ADMIN).status == 200
    ready_on(router, api_key, model, 2)

    # Nothing of it reached the index; a's conversation still goes to a.
    assert b not in index_of(router)
    for _ in range(3):
        assert chat(router, api_key, turn(model, "delta", 1)) == a
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    assert 'llmlb_router_cache_reports_total{result="invalid"}' in text


def test_a_restarted_router_routes_by_prefix_again_from_a_snapshot(spawn, tmp_path, mock):
    home = tmp_path / "home"
    first = start_router(spawn, home, ADMIN, env=ENV)
    key = call(first, "POST", "/v0/keys", ADMIN, {"scope": "api"}).json["key"]
    beats = Beats(first)
    try:
        model, a, b = pair(first, key, beats, mock)
    finally:
        beats.close()
    node_a = Reporter(a)
    assert node_a.snapshot(first, model, held_after(model, "epsilon", 0)).status == 202
    assert chat(first, key, turn(model, "epsilon", 1)) == a
    first.proc.stop()

    second = start_router(spawn, home, ADMIN, env=ENV)  # the same database, nothing in memory
    beats = Beats(second)
    try:
        for node_id in (a, b):
            beats.bodies[node_id] = {"slots": 4, "models": [{"id": model, "state": "ready"}]}
        ready_on(second, key, model, 2)
        # The node's next delta is refused; it sends a snapshot, and no traffic is needed.
        reply = node_a.delta(second, model, stored=[1])
        assert reply.status == 409 and reply.json["error"]["code"] == "cache_resync"
        assert node_a.snapshot(second, model, held_after(model, "epsilon", 1)).status == 202
        assert chat(second, key, turn(model, "epsilon", 2)) == a
        assert routed(second, model, "prefix") == 1
    finally:
        beats.close()


def test_two_routers_send_a_conversation_to_the_same_node(spawn, tmp_path, postgres_url, mock):
    routers = start_routers(spawn, tmp_path, postgres_url, 2, {**ENV, "LLMLB_ADMIN_KEY": ADMIN})
    key = call(routers[0], "POST", "/v0/keys", ADMIN, {"scope": "api"}).json["key"]
    beats = Beats(routers[0])
    try:
        model, a, b = pair(routers[0], key, beats, mock)
        ready_on(routers[1], key, model, 2)
        holders = {f"conv{i}": (a, b)[i % 2] for i in range(6)}
        reporters = {a: Reporter(a), b: Reporter(b)}
        for node_id, reporter in reporters.items():
            keys = [
                k for tag, holder in holders.items() if holder == node_id
                for k in held_after(model, tag, 0)
            ]  # fmt: skip
            for router in routers:  # a node reports to every router of the fleet
                reporter.seq = 0
                assert reporter.snapshot(router, model, keys).status == 202
        for tag, holder in holders.items():
            for router in routers:
                assert chat(router, key, turn(model, tag, 1)) == holder
    finally:
        beats.close()


def test_p2c_routing_ignores_the_index(spawn, tmp_path, mock):
    router = start_router(spawn, tmp_path / "home", ADMIN, "--routing", "p2c", env=ENV)
    assert "routing p2c" in router.proc.log()
    key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api"}).json["key"]
    beats = Beats(router)
    try:
        model, a, b = pair(router, key, beats, mock)
        assert Reporter(a).snapshot(router, model, held_after(model, "zeta", 0)).status == 202
        served = {chat(router, key, turn(model, "zeta", 1)) for _ in range(40)}
        assert served == {a, b}
        assert routed(router, model, "prefix") == 0
        assert routed(router, model, "fallback") == 40
    finally:
        beats.close()


def test_the_workers_of_one_router_share_what_nodes_report(spawn, tmp_path, mock):
    router = start_router(spawn, tmp_path / "home", ADMIN, "--workers", "2", env=ENV)
    key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api"}).json["key"]
    beats = Beats(router)
    try:
        model, a, _b = pair(router, key, beats, mock)
        node_a = Reporter(a)
        held: set[int] = set()

        def report(n: int):
            """Turn ``n``'s new keys as a delta, or everything as a snapshot when the router
            asks for one (as a node does)."""
            fresh = set(held_after(model, "zeta", n)) - held
            held.update(fresh)
            reply = node_a.delta(router, model, stored=sorted(fresh))
            if reply.status == 409:
                assert reply.json["error"]["code"] == "cache_resync", reply.body
                reply = node_a.snapshot(router, model, sorted(held))
            return reply

        # A worker that started after the first reports asks for one snapshot; then every
        # post (each on its own connection, landing on either worker) is taken as it comes:
        # the worker knows the deltas the other applied and holds every key reported.
        assert node_a.snapshot(router, model, sorted(held)).status == 202
        for n in range(4):
            assert report(n).status == 202
        for n in range(4, 14):
            reply = node_a.delta(router, model, stored=sorted(set(held_after(model, "zeta", n))))
            held.update(held_after(model, "zeta", n))
            assert reply.status == 202, (n, reply.body)
            assert reply.json["keys"] == len(held)
        for _ in range(8):  # and both route the conversation's next turn to its holder
            assert chat(router, key, turn(model, "zeta", 14)) == a
    finally:
        beats.close()
