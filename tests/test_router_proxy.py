"""Tests of llmlb.router.proxy.proxy: the InferenceProxy driven in-process over ASGI, forwarding to
real mock backend processes (``bench/router/mock_backend.py``) on loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from llmlb.router.control.fleet import FleetView, ModelReport, NodeView, RegisteredModel
from llmlb.router.control.fleet import NodeState as FleetNode
from llmlb.router.proxy.metrics import ProxyMetrics
from llmlb.router.proxy.proxy import InferenceProxy, ProxySettings
from prometheus_client import CollectorRegistry

from tests.procs import Proc, free_port, wait_until_async

MOCK = Path(__file__).resolve().parents[1] / "bench" / "router" / "mock_backend.py"
MODEL = "org/model"


def start_mock(log: Path, port: int | None = None) -> tuple[Proc, str]:
    """Start the mock backend; returns it and its base URL."""
    port = port or free_port()
    proc = Proc([sys.executable, str(MOCK), "--port", str(port)], log)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(base + "/health", timeout=30)
    return proc, base


@pytest.fixture(scope="module")
def mock(tmp_path_factory) -> str:
    """Base URL of a mock backend shared by the module's tests."""
    proc, base = start_mock(tmp_path_factory.mktemp("mock") / "mock.log")
    yield base
    proc.stop()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def node(node_id: str, url: str, slots: int = 4, state: str = "ready") -> FleetNode:
    return FleetNode(NodeView(node_id, url, slots), True, {MODEL: ModelReport(state)})


def load(fleet: FleetView, *nodes: FleetNode, registered: tuple[str, ...] = (MODEL,)) -> None:
    models = [RegisteredModel(m, m, "gguf", 1, 0) for m in registered]
    fleet.load(list(nodes), models)


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[tuple[float, bytes]] = field(default_factory=list)

    def json(self) -> dict:
        return orjson.loads(self.body)

    def events(self) -> list[bytes]:
        return [line[6:] for line in self.body.split(b"\n") if line.startswith(b"data: ")]


async def call(
    proxy: InferenceProxy,
    payload: dict | bytes,
    path: str = "/v1/chat/completions",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    disconnect_after: float | None = None,
    scope_extra: dict | None = None,
) -> Result:
    """One request through the proxy's ASGI interface (the client may hang up after a while;
    ``scope_extra``: what the app adds to the scope, such as the key's entry)."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json"), *headers],
        **(scope_extra or {}),
    }
    delivered = False
    result = Result(0, {}, b"")

    async def receive() -> dict:
        nonlocal delivered
        if delivered:
            if disconnect_after is None:
                await asyncio.Event().wait()
            await asyncio.sleep(disconnect_after)
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            result.chunks.append((time.monotonic(), message.get("body", b"")))

    await proxy(scope, receive, send)
    result.body = b"".join(chunk for _, chunk in result.chunks)
    return result


@contextlib.asynccontextmanager
async def running(fleet: FleetView, clock=time.monotonic, **settings):
    registry = CollectorRegistry()
    metrics = ProxyMetrics(registry)
    proxy = InferenceProxy(fleet, ProxySettings(**settings), metrics=metrics, clock=clock)
    proxy.registry = registry
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def sample(proxy: InferenceProxy, name: str, **labels: str) -> float:
    return proxy.registry.get_sample_value(name, labels) or 0.0


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_forwards_original_bytes_and_relays_the_answer(mock):
    raw = (
        b'{ "messages" : [{"role":"user","content":"h\\u00e9llo  \xc3\xa9"}],'
        b' "model" : "Org/Model", "temperature": 1.50, "z": null }'
    )

    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", f"{mock}/_mock/e1/echo"))
        async with running(fleet) as proxy:
            auth = ((b"authorization", b"Bearer sk-client"),)
            for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
                res = await call(proxy, raw, path=path, headers=auth)
                assert res.status == 200
                echo = res.json()
                assert echo["body"].encode() == raw  # byte for byte, never re-serialised
                assert echo["path"] == path
                assert echo["headers"]["content-type"] == "application/json"
                assert "authorization" not in echo["headers"]
                assert res.headers["x-llmlb-node"] == "n1"
                assert res.headers["x-mock-node"] == "e1"

    asyncio.run(scenario())


def test_non_streaming_answer_and_metrics(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock))
        async with running(fleet) as proxy:
            res = await call(proxy, CHAT)
            assert res.status == 200
            assert res.json()["object"] == "chat.completion"
            assert int(res.headers["content-length"]) == len(res.body)
            assert len(res.chunks) == 1  # whole small answers go out in one message
            labels = {"node": "n1", "model": MODEL}
            assert sample(proxy, "llmlb_proxy_requests_total", code="200", **labels) == 1
            assert sample(proxy, "llmlb_proxy_ttfb_seconds_count", **labels) == 1
            assert sample(proxy, "llmlb_proxy_overhead_seconds_count") == 1
            assert sample(proxy, "llmlb_proxy_outstanding", node="n1") == 0
            res = await call(proxy, {**CHAT, "stream": True})
            assert res.status == 200 and res.headers["content-type"] == "text/event-stream"
            events = res.events()
            assert len(events) == 21 and events[-1] == b"[DONE]"

    asyncio.run(scenario())


def test_stream_is_relayed_as_it_arrives(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", f"{mock}/_mock/d1/drip100"))
        async with running(fleet) as proxy:
            res = await call(proxy, {**CHAT, "stream": True})
            assert res.status == 200 and len(res.events()) == 6  # 5 events, [DONE]
            data = [(t, c) for t, c in res.chunks if c]
            assert len(data) >= 5  # one message per event as they came, not one buffer
            assert data[-1][0] - data[0][0] >= 0.35

    asyncio.run(scenario())


def test_client_disconnect_stops_the_relay(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", f"{mock}/_mock/gone/drip1000"))
        async with running(fleet) as proxy:
            started = time.monotonic()
            res = await call(proxy, {**CHAT, "stream": True}, disconnect_after=0.3)
            assert time.monotonic() - started < 2.0  # not the node's 5 s stream
            assert len(res.events()) == 1
            labels = {"node": "n1", "model": MODEL}
            assert sample(proxy, "llmlb_proxy_errors_total", kind="client_gone", **labels) == 1
            assert proxy.balancer.nodes["n1"].outstanding == 0
            assert proxy.balancer.nodes["n1"].healthy and proxy.balancer.nodes["n1"].failures == 0

    asyncio.run(scenario())


def test_bad_requests_are_answered_by_the_router(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock))
        async with running(fleet, max_body_bytes=1000) as proxy:
            cases = [
                (b"{not json", 400, "invalid_request_error"),
                (b"[1, 2]", 400, "invalid_request_error"),
                (b'{"messages": []}', 400, "invalid_request_error"),
                (b'{"model": 7}', 400, "invalid_request_error"),
                (b'{"model": "bad//id"}', 400, "invalid_model_id"),
                (b'{"model": "nobody/has-this"}', 404, "model_not_found"),
                (orjson.dumps({"model": MODEL, "pad": "x" * 2000}), 413, "request_too_large"),
            ]
            for body, status, code in cases:
                res = await call(proxy, body)
                assert res.status == status, body
                error = res.json()["error"]
                assert error["code"] == code and error["message"] and error["type"]
            assert sample(proxy, "llmlb_proxy_rejected_total", code="404") == 1

    asyncio.run(scenario())


class WatchedFleet(FleetView):
    """A fleet view that says when the proxy asked it how a model is doing."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()

    def model_status(self, model_id: str) -> str:
        self.asked.set()
        return super().model_status(model_id)


def test_model_being_downloaded_is_waited_for(mock):
    async def scenario() -> None:
        fleet = WatchedFleet()
        load(fleet, node("n1", mock, state="downloading"))
        async with running(fleet, ready_wait_s=10) as proxy:
            task = asyncio.create_task(call(proxy, CHAT))
            await asyncio.wait_for(fleet.asked.wait(), 5)  # found no ready node...
            await asyncio.sleep(0)  # ...and went on to wait for a change
            assert not task.done()
            load(fleet, node("n1", mock))  # the node reports it ready
            res = await asyncio.wait_for(task, 5)
            assert res.status == 200

    asyncio.run(scenario())


def test_model_not_ready_in_time_gets_503_with_retry_after(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock, state="loading"))
        async with running(fleet, ready_wait_s=0.3) as proxy:
            started = time.monotonic()
            res = await call(proxy, CHAT)
            assert 0.25 <= time.monotonic() - started < 3
            assert res.status == 503 and res.json()["error"]["code"] == "model_not_ready"
            assert int(res.headers["retry-after"]) >= 1
            load(fleet)  # registered, no node has it: same answer after the bound
            res = await call(proxy, CHAT)
            assert res.status == 503 and res.json()["error"]["code"] == "model_not_ready"

    asyncio.run(scenario())


@pytest.mark.parametrize("mode", ["fail500", "down", "dead", "slow", "drop"])
def test_failover_before_any_byte(mock, mode):
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)  # a request arrived: hang up without answering
        writer.close()

    async def scenario() -> None:
        fleet = FleetView()
        dropper = await asyncio.start_server(drop, "127.0.0.1", 0)
        bad_url = {
            "fail500": f"{mock}/_mock/bad-{mode}/fail500",
            "down": f"{mock}/_mock/bad-{mode}/down",  # 500, and /health 503
            "dead": dead_url(),
            "slow": f"{mock}/_mock/bad-{mode}/sleep3000",
            "drop": f"http://127.0.0.1:{dropper.sockets[0].getsockname()[1]}",
        }[mode]
        load(fleet, node("bad", bad_url), node("good", f"{mock}/_mock/good-{mode}/ok"))
        settings = {"first_byte_timeout_s": 0.3, "failure_threshold": 2, "cooldown_s": 60}
        async with running(fleet, **settings) as proxy:
            # Different requests: failures of one request count once against a node.
            results = await asyncio.gather(*(call(proxy, {**CHAT, "seed": i}) for i in range(6)))
            results += [await call(proxy, {**CHAT, "seed": i}) for i in range(6, 12)]
            assert [r.status for r in results] == [200] * 12
            assert {r.headers["x-llmlb-node"] for r in results} == {"good"}
            retries = sample(proxy, "llmlb_proxy_retries_total", node="bad", model=MODEL)
            assert retries >= 1
            kind = {
                "fail500": "status",
                "down": "status",
                "dead": "connect",
                "slow": "timeout",
                "drop": "disconnect",
            }
            errors = sample(
                proxy, "llmlb_proxy_errors_total", node="bad", model=MODEL, kind=kind[mode]
            )
            assert errors == retries
            bad = proxy.balancer.nodes["bad"]
            if mode == "fail500":  # 500s may be the requests' doing: no cool-down...
                assert bad.healthy and bad.failures == 0
            else:  # ...a failed health check, time-outs, lost connections are the node's
                # the health check runs in background
                await wait_until_async(lambda: not bad.healthy)
                if mode != "down":
                    assert errors <= 6  # the cool-down stopped the attempts on the bad node
            if mode == "dead":  # a refused connection takes the node offline in the fleet
                assert [v.node_id for v in fleet.ready_nodes(MODEL)] == ["good"]
        dropper.close()

    asyncio.run(scenario())


def mock_stats(mock: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{mock}/_stats", timeout=5) as response:
        return orjson.loads(response.read())


def test_request_refused_by_two_nodes_is_the_requests_fault(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, *(node(f"p{i}", f"{mock}/_mock/poison{i}/fail500") for i in range(3)))
        async with running(fleet, failure_threshold=2, cooldown_s=30) as proxy:
            for _ in range(4):  # a client retrying one bad request
                res = await call(proxy, CHAT)
                assert res.status == 500  # the last node's own error, relayed
                assert res.json()["error"]["code"] == "mock_failure"
            hits = {tag: n for tag, n in mock_stats(mock).items() if tag.startswith("poison")}
            assert sum(hits.values()) == 8  # two nodes per request, never the third
            assert all(state.healthy for state in proxy.balancer.nodes.values())
            assert all(state.failures == 0 for state in proxy.balancer.nodes.values())
            assert (
                sample(proxy, "llmlb_proxy_retries_total", node="p0", model=MODEL)
                + sample(proxy, "llmlb_proxy_retries_total", node="p1", model=MODEL)
                + sample(proxy, "llmlb_proxy_retries_total", node="p2", model=MODEL)
                == 4
            )

    asyncio.run(scenario())


def test_a_node_answering_500_is_cooled_down_only_when_its_health_check_fails(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("s1", f"{mock}/_mock/s1/strict"))
        async with running(fleet, failure_threshold=2, cooldown_s=30) as proxy:
            # A steady stream of different requests the node refuses with 500 (as a node
            # did with every penalty): other requests are served all along.
            for i in range(12):
                res = await call(proxy, {**CHAT, "temperature": "hot", "seed": i})
                assert res.status == 500
                assert (await call(proxy, CHAT)).status == 200
            state = proxy.balancer.nodes["s1"]
            assert state.healthy and state.failures == 0
        load(fleet, node("f1", f"{mock}/_mock/f1/down"))  # 500 to all, and /health 503
        async with running(fleet, failure_threshold=2, cooldown_s=30) as proxy:
            res = await call(proxy, CHAT)
            assert res.status == 500 and res.json()["error"]["code"] == "mock_failure"
            # checked: cooled
            await wait_until_async(lambda: not proxy.balancer.nodes["f1"].healthy)
            res = await call(proxy, CHAT)
            assert res.status == 503 and res.json()["error"]["code"] == "nodes_unavailable"
            assert 1 <= int(res.headers["retry-after"]) <= 30
        load(fleet, node("d1", dead_url()))
        async with running(fleet) as proxy:
            res = await call(proxy, CHAT)
            assert res.status == 502 and res.json()["error"]["code"] == "upstream_error"

    asyncio.run(scenario())


def test_failure_mid_stream_ends_with_an_sse_error_event(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("b1", f"{mock}/_mock/b1/break"))
        async with running(fleet) as proxy:
            res = await call(proxy, {**CHAT, "stream": True})
            assert res.status == 200
            events = res.events()
            assert len(events) == 4
            assert b"tok2" in events[2]
            error = orjson.loads(events[3])["error"]
            assert error["code"] == "upstream_error" and "b1" in error["message"]
            labels = {"node": "b1", "model": MODEL}
            assert sample(proxy, "llmlb_proxy_errors_total", kind="stream", **labels) == 1

    asyncio.run(scenario())


def test_cooled_down_node_is_health_probed_back(tmp_path):
    port = free_port()
    proc, base = start_mock(tmp_path / "m1.log", port)
    other, other_base = start_mock(tmp_path / "m2.log")

    async def scenario() -> None:
        nonlocal proc
        fleet = FleetView()
        urls = {"x": f"{base}/_mock/x/ok", "y": f"{other_base}/_mock/y/ok"}
        load(fleet, *(node(n, url) for n, url in urls.items()))
        # p2c: with prefix routing the same prompt would stay on the node holding it.
        async with running(fleet, cooldown_s=0.3, routing="p2c") as proxy:
            await asyncio.gather(*(call(proxy, CHAT) for _ in range(4)))
            proc.kill()
            for _ in range(100):  # until a request finds x dead (each one still succeeds)
                res = await call(proxy, CHAT)
                assert res.status == 200 and res.headers["x-llmlb-node"] == "y"
                if not proxy.balancer.nodes["x"].healthy:
                    break
            assert not proxy.balancer.nodes["x"].healthy
            assert [v.node_id for v in fleet.ready_nodes(MODEL)] == ["y"]  # taken offline
            proc = Proc(proc.argv, tmp_path / "m1b.log")
            proc.wait_http(base + "/health")
            # The node's next heartbeat brings it back into the fleet.
            load(fleet, *(node(n, url) for n, url in urls.items()))
            seen: Counter = Counter()

            def back() -> bool:
                return seen["x"] > 0

            async def poll() -> None:
                while not back():
                    res = await call(proxy, CHAT)
                    assert res.status == 200
                    seen[res.headers["x-llmlb-node"]] += 1
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(poll(), 10)
            assert proxy.balancer.nodes["x"].healthy

    try:
        asyncio.run(scenario())
    finally:
        proc.stop()
        other.stop()


def test_affinity_by_user_and_session_header(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("a", f"{mock}/_mock/aff-a/ok"), node("b", f"{mock}/_mock/aff-b/ok"))
        # p2c: with prefix routing the same prompt would stay on one node whoever sends it.
        async with running(fleet, routing="p2c") as proxy:
            for user in ("alice", "bob", "carol"):
                served = {
                    (await call(proxy, {**CHAT, "user": user})).headers["x-llmlb-node"]
                    for _ in range(8)
                }
                assert len(served) == 1
            session = ((b"x-session-id", b"s-42"),)
            served = {
                (await call(proxy, CHAT, headers=session)).headers["x-llmlb-node"] for _ in range(8)
            }
            assert len(served) == 1
            users = [(await call(proxy, {**CHAT, "user": f"u{i}"})) for i in range(16)]
            assert {r.headers["x-llmlb-node"] for r in users} == {"a", "b"}

    asyncio.run(scenario())


def test_affinity_yields_when_its_node_is_saturated(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(
            fleet,
            node("a", f"{mock}/_mock/sat-a/sleep300", slots=1),
            node("b", f"{mock}/_mock/sat-b/sleep300", slots=1),
        )
        async with running(fleet) as proxy:
            first = await call(proxy, {**CHAT, "user": "dora"})
            home = first.headers["x-llmlb-node"]
            results = await asyncio.gather(
                *(call(proxy, {**CHAT, "user": "dora"}) for _ in range(2))
            )
            assert sorted(r.headers["x-llmlb-node"] for r in results) == ["a", "b"]
            assert home in {r.headers["x-llmlb-node"] for r in results}

    asyncio.run(scenario())


def test_least_outstanding_spreads_concurrent_requests(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(
            fleet,
            node("a", f"{mock}/_mock/lo-a/sleep200", slots=4),
            node("b", f"{mock}/_mock/lo-b/sleep200", slots=4),
        )
        async with running(fleet) as proxy:
            results = await asyncio.gather(*(call(proxy, CHAT) for _ in range(8)))
            served = Counter(r.headers["x-llmlb-node"] for r in results)
            assert served == {"a": 4, "b": 4}

    asyncio.run(scenario())


def test_requests_queue_when_every_node_is_at_capacity(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("q", f"{mock}/_mock/q/sleep150", slots=1))
        async with running(fleet, queue_timeout_s=10) as proxy:
            started = time.monotonic()
            results = await asyncio.gather(*(call(proxy, CHAT) for _ in range(3)))
            assert [r.status for r in results] == [200, 200, 200]
            assert time.monotonic() - started >= 0.4  # one at a time on the single slot
            assert sample(proxy, "llmlb_proxy_queue_wait_seconds_count", model=MODEL) == 2
            assert len(proxy.queue) == 0

    asyncio.run(scenario())


def test_queue_bounds_answer_429_with_retry_after(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("q", f"{mock}/_mock/qb/sleep400", slots=1))
        async with running(fleet, queue_max=1, queue_timeout_s=10, retry_after_s=2) as proxy:
            results = await asyncio.gather(*(call(proxy, CHAT) for _ in range(3)))
            statuses = sorted(r.status for r in results)
            assert statuses == [200, 200, 429]  # one served, one queued, one refused
            refused = next(r for r in results if r.status == 429)
            assert refused.json()["error"]["code"] == "too_many_requests"
            assert refused.headers["retry-after"] == "2"
        async with running(fleet, queue_timeout_s=0.1) as proxy:
            results = await asyncio.gather(*(call(proxy, CHAT) for _ in range(2)))
            assert sorted(r.status for r in results) == [200, 429]

    asyncio.run(scenario())


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    (tmp_path / "config.json").write_bytes(b'{"proxy": {"ready_wait_s": 4}}')
    monkeypatch.setenv("LLMLB_PROXY_COOLDOWN_S", "2.5")
    monkeypatch.setenv("LLMLB_PROXY_QUEUE_MAX", "7")
    settings = ProxySettings.from_config()
    assert settings.cooldown_s == 2.5 and settings.queue_max == 7
    assert settings.ready_wait_s == 4.0 and settings.connect_timeout_s == 3.0
    monkeypatch.setenv("LLMLB_PROXY_MAX_RETRIES", "many")
    with pytest.raises(ValueError, match="max_retries"):
        ProxySettings.from_config()


class Fragile:
    """A node on a loopback port that a request's content can break, as a real node's worker
    crash or a runaway decode would: a body holding ``poison`` makes it hang up without an
    answer, ``hang`` makes it never answer, ``cut`` gets one SSE event and then a hang-up;
    other requests get a small JSON answer, ``GET /health`` 200. ``bodies`` records every
    request body that arrived."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def got(self, marker: bytes) -> int:
        return sum(marker in body for body in self.bodies)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"POST"):
                    self.bodies.append(body)
                if b"poison" in body:
                    return  # the worker died with the request
                if b"hang" in body:
                    await reader.read()  # until the router gives up
                    return
                if b"cut" in body:
                    event = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
                    )
                    await writer.drain()
                    return
                writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"ok":true}')
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def reached(nodes: list[Fragile], marker: bytes) -> int:
    """How many of ``nodes`` received a body holding ``marker`` (a request that arrives on a
    stale keep-alive connection may be sent to the same node twice: counted once)."""
    return sum(1 for n in nodes if n.got(marker))


@contextlib.asynccontextmanager
async def fragile_fleet(count: int):
    nodes = [Fragile() for _ in range(count)]
    try:
        yield nodes, [await n.start() for n in nodes]
    finally:
        for n in nodes:
            n.close()


def test_a_request_two_nodes_lost_is_poison_and_refused_at_once():
    clock = Clock()

    async def scenario() -> None:
        async with fragile_fleet(3) as (nodes, urls):
            fleet = FleetView()
            # A node where nothing listens, too: a refused connection never counts.
            load(fleet, node("dead", dead_url()), *(node(f"f{i}", u) for i, u in enumerate(urls)))
            # One failure of a request would cool a node down: none may be counted.
            settings = {"failure_threshold": 1, "cooldown_s": 30, "poison_ttl_s": 60}
            async with running(fleet, clock=clock, max_retries=3, **settings) as proxy:
                bad = {**CHAT, "x": "poison"}
                res = await call(proxy, bad)
                assert res.status == 502, res.body
                assert res.json()["error"]["code"] == "poison_request"
                assert reached(nodes, b"poison") == 2  # one more node, no third
                arrived = sum(n.got(b"poison") for n in nodes)
                for _ in range(3):  # an SDK's retries: refused without reaching a node
                    res = await call(proxy, bad)
                    assert res.status == 502
                    assert res.json()["error"]["code"] == "poison_request"
                assert sum(n.got(b"poison") for n in nodes) == arrived
                states = [proxy.balancer.nodes[f"f{i}"] for i in range(3)]
                assert all(s.healthy and s.failures == 0 for s in states)
                served = {(await call(proxy, {**CHAT, "seed": i})).status for i in range(9)}
                assert served == {200}  # the fleet serves everyone else
                poisoned = sample(
                    proxy, "llmlb_proxy_errors_total", node="", model=MODEL, kind="poison"
                )
                assert poisoned == 3
                # The same on an Anthropic route, in Anthropic's shape.
                res = await call(
                    proxy, {**CHAT, "max_tokens": 5, "x": "poison"}, path="/v1/messages"
                )
                assert res.status == 502 and res.json()["type"] == "error"
                assert "two nodes failed" in res.json()["error"]["message"]
                # Remembered for poison_ttl_s, then tried again.
                clock.now += 61
                for n in nodes:
                    n.bodies.clear()
                assert (await call(proxy, bad)).json()["error"]["code"] == "poison_request"
                assert reached(nodes, b"poison") == 2

    asyncio.run(scenario())


def test_a_request_two_nodes_timed_out_on_is_poison():
    async def scenario() -> None:
        async with fragile_fleet(3) as (nodes, urls):
            fleet = FleetView()
            load(fleet, *(node(f"f{i}", u) for i, u in enumerate(urls)))
            settings = {"failure_threshold": 1, "cooldown_s": 30, "first_byte_timeout_s": 0.3}
            async with running(fleet, **settings) as proxy:
                res = await call(proxy, {**CHAT, "x": "hang"})
                assert res.status == 502 and res.json()["error"]["code"] == "poison_request"
                assert reached(nodes, b"hang") == 2
                assert all(s.healthy for s in proxy.balancer.nodes.values())
                assert (await call(proxy, CHAT)).status == 200

    asyncio.run(scenario())


def test_a_request_one_node_lost_goes_to_one_more_node_and_that_node_is_blamed(mock):
    async def scenario() -> None:
        async with fragile_fleet(1) as (nodes, urls):
            fleet = FleetView()
            load(fleet, node("fragile", urls[0]), node("good", f"{mock}/_mock/one-more/ok"))
            # p2c: with prefix routing the prompt would stay on the node that answered it.
            async with running(fleet, failure_threshold=1, cooldown_s=30, routing="p2c") as proxy:
                for i in range(20):  # until one went to the fragile node first
                    res = await call(proxy, {**CHAT, "seed": i, "x": "poison"})
                    assert res.status == 200 and res.headers["x-llmlb-node"] == "good"
                    if nodes[0].got(b"poison"):
                        break
                assert nodes[0].got(b"poison") == 1
                # The other node served it: the node that lost it was at fault.
                assert not proxy.balancer.nodes["fragile"].healthy
                assert len(proxy.poison) == 0  # and the request is not suspect any more

    asyncio.run(scenario())


def test_a_request_whose_stream_two_nodes_cut_is_poison_for_the_next_try():
    async def scenario() -> None:
        async with fragile_fleet(2) as (nodes, urls):
            fleet = FleetView()
            load(fleet, *(node(f"f{i}", u) for i, u in enumerate(urls)))
            async with running(fleet, failure_threshold=2, cooldown_s=30) as proxy:
                cut = {**CHAT, "stream": True, "x": "cut"}
                for _ in range(30):  # the client retries a stream that broke
                    res = await call(proxy, cut)
                    assert res.status == 200
                    error = orjson.loads(res.events()[-1])["error"]
                    assert error["code"] == "upstream_error"
                    if all(n.got(b"cut") for n in nodes):
                        break
                assert all(n.got(b"cut") for n in nodes)
                res = await call(proxy, cut)  # two nodes broke it: not sent again
                assert res.status == 502 and res.json()["error"]["code"] == "poison_request"
                assert all(s.healthy and s.failures == 0 for s in proxy.balancer.nodes.values())

    asyncio.run(scenario())


def test_a_quick_answer_leaves_the_client_unwatched_and_a_long_one_watched(mock):
    """The client's disconnect is watched (a second ``receive()``) only for requests still in
    the router after ``_WATCH_AFTER_S``: a server's disconnect watch costs thread wake-ups."""
    from llmlb.router.proxy.proxy import _WATCH_AFTER_S

    async def receives(url: str) -> tuple[float, int]:
        """How long one chat request to a node at ``url`` took, and its receive() calls."""
        calls = 0

        async def receive() -> dict:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": orjson.dumps(CHAT), "more_body": False}
            await asyncio.Event().wait()
            return {}

        async def send(message: dict) -> None:
            pass

        fleet = FleetView()
        load(fleet, node("n1", url))
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": [(b"content-type", b"application/json")],
        }
        async with running(fleet) as proxy:
            started = time.monotonic()
            await proxy(scope, receive, send)
            return time.monotonic() - started, calls

    async def scenario() -> None:
        took, calls = await receives(mock)
        assert calls == 1 or took >= _WATCH_AFTER_S  # quick: never watched
        took, calls = await receives(f"{mock}/_mock/slow/sleep600")
        assert took >= 0.5 and calls == 2  # watched while the node worked

    asyncio.run(scenario())


def test_a_body_whose_first_message_holds_its_length_is_read_in_one_receive(mock):
    """Granian hands a body over with ``more_body`` set and then an empty last message: with
    ``Content-Length`` met by the first message the proxy does not wait for the second; a body
    split over several messages is still read whole. (A request still in the router after
    ``_WATCH_AFTER_S`` gets one more receive(), its disconnect watch.)"""
    from llmlb.router.proxy.proxy import _WATCH_AFTER_S

    raw = orjson.dumps({**CHAT, "user": "u" * 300})

    async def forward(messages: list[dict], length: int | None) -> tuple[dict, int, float]:
        """The echo node's view of the request, the receive() calls and the seconds it took."""
        calls = 0

        async def receive() -> dict:
            nonlocal calls
            calls += 1
            if calls <= len(messages):
                return messages[calls - 1]
            await asyncio.Event().wait()
            return {}

        answer: list[bytes] = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                answer.append(message.get("body", b""))

        fleet = FleetView()
        load(fleet, node("n1", f"{mock}/_mock/rb/echo"))
        headers = [(b"content-type", b"application/json")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "headers": headers,
        }
        async with running(fleet) as proxy:
            started = time.monotonic()
            await proxy(scope, receive, send)
            took = time.monotonic() - started
        return orjson.loads(b"".join(answer)), calls, took

    def message(body: bytes, more: bool) -> dict:
        return {"type": "http.request", "body": body, "more_body": more}

    async def scenario() -> None:
        whole_then_end = [message(raw, True), message(b"", False)]
        echo, calls, took = await forward(whole_then_end, len(raw))
        assert echo["body"].encode() == raw
        assert calls == 1 or (calls == 2 and took >= _WATCH_AFTER_S)
        echo, calls, took = await forward(whole_then_end, None)  # no length: read to the end
        assert echo["body"].encode() == raw
        assert calls == 2 or (calls == 3 and took >= _WATCH_AFTER_S)
        split = [message(raw[:100], True), message(raw[100:], False)]
        echo, calls, took = await forward(split, len(raw))
        assert echo["body"].encode() == raw
        assert calls == 2 or (calls == 3 and took >= _WATCH_AFTER_S)

    asyncio.run(scenario())
