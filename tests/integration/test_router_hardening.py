"""Router hardening against a real ``llmlb router`` process: poison requests (refused by two
nodes, or killing two nodes), what cools a node down (never a request's 500), the in-flight
limit, abandoned requests, hung and vanished nodes, models no node can serve.

Nodes are the project's mock backend (``bench/router/mock_backend.py``, a real Granian
process) or :class:`RecordingNode`, a loopback HTTP server that records when the router
closes each connection. The test process registers them and sends their heartbeats.
"""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from tests.procs import Proc, free_port, wait_until
from tests.router_fixtures import RouterUrl, call, start_router

ADMIN = "sk-test-admin-key-hardening-0123"
MOCK = Path(__file__).resolve().parents[2] / "bench" / "router" / "mock_backend.py"
HEARTBEAT_S = 0.5  # the router takes a node offline after 3 missed heartbeats: 1.5 s
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


# -- nodes -----------------------------------------------------------------------------------


@dataclass
class Connection:
    """One connection the router opened to a :class:`RecordingNode`."""

    path: str = ""
    opened: float = 0.0
    closed: float | None = None  # when the router closed it
    body: bytes = b""


@dataclass
class RecordingNode:
    """A node on a loopback port whose behaviour is chosen by the first path segment of its
    URL: ``hold`` never answers, ``drip`` streams an SSE event every 0.1 s for ever,
    ``fragile`` hangs up without an answer on a body holding ``deadly`` (as a node whose
    worker a request kills) and answers others ``{}``; any other POST gets ``{}``;
    ``GET /health`` 200. Inference requests are recorded in ``connections``, with the time
    the router closed each one (``fragile`` ones with their body)."""

    connections: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._handlers: set[asyncio.Task] = set()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            server = self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: Connection | None = None
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                mode = path.decode().split("/")[1]
                if method == b"POST" and mode == "fragile":
                    with self._lock:
                        self.connections.append(
                            Connection(path.decode(), time.monotonic(), body=body)
                        )
                    if b"deadly" in body:
                        break  # the worker died with the request: no answer
                if method == b"GET" or mode not in ("hold", "drip"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                conn = Connection(path.decode(), time.monotonic())
                with self._lock:
                    self.connections.append(conn)
                if mode == "hold":
                    await reader.read()  # until the router closes the connection
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                        b"transfer-encoding: chunked\r\n\r\n"
                    )
                    while True:
                        event = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                        await asyncio.sleep(0.1)
                break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if conn is not None:
                conn.closed = time.monotonic()
            writer.close()

    def requests(self, mode: str) -> list[Connection]:
        with self._lock:
            return [c for c in self.connections if c.path.startswith(f"/{mode}/")]

    def close(self) -> None:
        async def shutdown() -> None:  # end the connections the router keeps alive, too
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class Beats:
    """Heartbeats for the nodes the test registered, every ``HEARTBEAT_S``, until stopped."""

    def __init__(self, router: str) -> None:
        self.router = router
        self.bodies: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 2):
            for node_id, body in list(self.bodies.items()):
                call(self.router, "POST", f"/v0/nodes/{node_id}/heartbeat", ADMIN, body, timeout=5)

    def register(self, node_id: str, url: str, models: list[dict], **extra: object) -> None:
        body = {"node_id": node_id, "url": url, "slots": 64, "models": models, **extra}
        reply = call(self.router, "POST", "/v0/nodes", ADMIN, body)
        assert reply.status in (200, 201), reply.body
        self.bodies[node_id] = {k: v for k, v in body.items() if k in ("slots", "models")}

    def stop(self, node_id: str) -> None:
        self.bodies.pop(node_id, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_mock(spawn, name: str = "mock") -> tuple[Proc, str]:
    port = free_port()
    proc = spawn([sys.executable, str(MOCK), "--port", str(port)], name=name)
    base = f"http://127.0.0.1:{port}"
    proc.wait_http(base + "/health", timeout=30)
    return proc, base


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.procs import spawner

    start, stop_all = spawner(tmp_path_factory.mktemp("logs"))
    yield start
    stop_all()


@pytest.fixture(scope="module")
def router(module_spawn, tmp_path_factory: pytest.TempPathFactory) -> RouterUrl:
    env = {
        "LLMLB_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "LLMLB_PROXY_COOLDOWN_S": "1",
        "LLMLB_PROXY_TOTAL_TIMEOUT_S": "4",
    }
    home = tmp_path_factory.mktemp("home")
    return start_router(
        module_spawn, home, ADMIN, "--max-inflight", "4", "--stream-idle-timeout", "1", env=env
    )


@pytest.fixture(scope="module")
def api_key(router: RouterUrl) -> str:
    reply = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "hardening"})
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


@pytest.fixture
def recorder() -> Iterator[RecordingNode]:
    node = RecordingNode()
    yield node
    node.close()


def ready(model: str, **extra: object) -> list[dict]:
    return [{"id": model, "state": "ready", **extra}]


def chat(router: str, key: str, model: str, timeout: float = 10.0, **extra: object):
    body = {**CHAT, "model": model, **extra}
    return call(router, "POST", "/v1/chat/completions", key, body, timeout=timeout)


def wait_routed(router: str, key: str, model: str) -> None:
    wait_until(
        lambda: chat(router, key, model).status == 200, timeout=10, message=f"{model} routed"
    )


class Stream:
    """A raw streaming request to the router, read event by event."""

    def __init__(self, router: str, key: str, body: dict) -> None:
        host, port = router.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=15)
        payload = orjson.dumps({**CHAT, **body, "stream": True})
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.conn.request("POST", "/v1/chat/completions", payload, headers)
        self._resp: http.client.HTTPResponse | None = None

    @property
    def resp(self) -> http.client.HTTPResponse:
        """The answer (waits for its head on first use)."""
        if self._resp is None:
            self._resp = self.conn.getresponse()
        return self._resp

    def event(self) -> bytes | None:
        """The next ``data:`` payload, or ``None`` at the end of the stream."""
        while True:
            line = self.resp.readline()
            if not line:
                return None
            if line.startswith(b"data: "):
                return line[6:].strip()

    def rest(self) -> list[bytes]:
        events = []
        while (event := self.event()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def metric(router: str, name: str) -> float:
    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- 1: poison requests ----------------------------------------------------------------------


def test_poison_request_cools_no_node_down(router, api_key, beats, mock):
    model = "poison/two-nodes"
    for tag in ("a", "b"):
        beats.register(f"poison-{tag}", f"{mock}/_mock/poison-{tag}/strict", ready(model))
    wait_routed(router, api_key, model)
    before = orjson.loads(call(mock, "GET", "/_stats").body)
    # Bad parameters, each sent 3 times (an SDK's retries): the nodes answer 500.
    for bad in ({"temperature": "hot"}, {"stop": 5}, {"seed": "x"}):
        for _ in range(3):
            assert chat(router, api_key, model, **bad).status == 500
    stats = orjson.loads(call(mock, "GET", "/_stats").body)
    hits = sum(stats[tag] - before.get(tag, 0) for tag in ("poison-a", "poison-b"))
    assert hits == 9 * 2  # two nodes per request, no more
    started = time.monotonic()
    reply = chat(router, api_key, model)
    assert reply.status == 200, reply.body  # no node was cooled down
    assert time.monotonic() - started < 1.0


def test_a_steady_stream_of_500s_changes_nothing_for_other_clients(router, api_key, beats, mock):
    model = "poison/steady-500"
    beats.register("steady", f"{mock}/_mock/steady/strict", ready(model))
    wait_routed(router, api_key, model)
    # One client sends different requests the node answers 500 (as every penalty was), all
    # the time; the node used to be cooled down after three of them.
    bad: list[int] = []
    stop = threading.Event()

    def refused_all_the_time() -> None:
        i = 0
        while not stop.is_set():
            bad.append(chat(router, api_key, model, temperature="hot", seed=i).status)
            i += 1

    client = threading.Thread(target=refused_all_the_time, daemon=True)
    client.start()
    try:
        wait_until(lambda: len(bad) >= 5, timeout=10, message="500s under way")
        others = [chat(router, api_key, model).status for _ in range(20)]
    finally:
        stop.set()
        client.join(15)
    assert others == [200] * 20
    assert len(bad) >= 5 and set(bad) == {500}


def test_one_node_cooled_down_is_back_when_the_cool_down_ends(router, api_key, beats, recorder):
    model = "poison/one-node"
    beats.register("single", f"{recorder.url}/fragile/single", ready(model))
    wait_routed(router, api_key, model)
    # Three different requests the node lost (its worker died with them; no other node can
    # tell whether they were at fault): evidence that the node fails, a cool-down.
    for i in range(3):
        reply = chat(router, api_key, model, x=f"deadly {i}")
        assert reply.status == 502 and reply.json["error"]["code"] == "upstream_error"
    reply = chat(router, api_key, model)
    assert reply.status == 503 and reply.json["error"]["code"] == "nodes_unavailable"
    # The health probe passes during the 1 s cool-down: served again once it ends.
    wait_until(lambda: chat(router, api_key, model).status == 200, timeout=10, message="back")


def test_a_request_that_kills_two_nodes_is_refused_for_good(router, api_key, beats, recorder):
    model = "poison/killer"
    for tag in ("a", "b", "c"):
        beats.register(f"killed-{tag}", f"{recorder.url}/fragile/{tag}", ready(model))
    wait_routed(router, api_key, model)

    def reached() -> set[str]:
        return {c.path.split("/")[2] for c in recorder.requests("fragile") if b"deadly" in c.body}

    reply = chat(router, api_key, model, x="deadly")
    assert reply.status == 502, reply.body
    assert reply.json["error"]["code"] == "poison_request"
    assert len(reached()) == 2  # one more node after the first, never the third
    arrived = len(recorder.requests("fragile"))
    for _ in range(3):  # the SDK's automatic retries of the same body
        reply = chat(router, api_key, model, x="deadly")
        assert reply.status == 502 and reply.json["error"]["code"] == "poison_request"
    assert len(recorder.requests("fragile")) == arrived  # not one reached a node
    # No node was cooled down: every one of them serves the next requests (each a new
    # prompt: prefix-aware routing would keep sending one prompt to the node holding it).
    served = [
        chat(router, api_key, model, messages=[{"role": "user", "content": f"hi {i}"}])
        for i in range(30)
    ]
    assert {r.status for r in served} == {200}
    assert {r.headers["x-llmlb-node"] for r in served} == {"killed-a", "killed-b", "killed-c"}


# -- 2: in-flight limit ----------------------------------------------------------------------


def test_requests_beyond_the_in_flight_limit_get_503_overloaded(router, api_key, beats, mock):
    model = "load/slow"
    beats.register("slow", f"{mock}/_mock/slow/drip300", ready(model))
    wait_routed(router, api_key, model)
    streams = [Stream(router, api_key, {"model": model}) for _ in range(6)]
    statuses = sorted(s.resp.status for s in streams)
    assert statuses == [200] * 4 + [503] * 2
    for stream in streams:
        if stream.resp.status == 503:
            assert int(stream.resp.getheader("retry-after")) >= 1
            body = orjson.loads(stream.resp.read())
            assert body["error"]["code"] == "overloaded"
    started = time.monotonic()
    assert call(router, "GET", "/health").status == 200
    assert time.monotonic() - started < 0.5
    for stream in streams:
        if stream.resp.status == 200:
            assert stream.rest()[-1] == b"[DONE]"  # the admitted streams were not cut
        stream.close()


# -- 6: abandoned requests -------------------------------------------------------------------


def test_client_disconnect_closes_the_node_connection(router, api_key, beats, recorder):
    beats.register("rec-hold", f"{recorder.url}/hold", ready("gone/hold"))
    beats.register("rec-drip", f"{recorder.url}/drip", ready("gone/drip"))
    # Before the first byte: a non-streaming request the node works on.
    with pytest.raises(OSError):
        chat(router, api_key, "gone/hold", timeout=0.5)
    wait_until(lambda: recorder.requests("hold"), timeout=5, message="request forwarded")
    left = time.monotonic()
    wait_until(lambda: recorder.requests("hold")[0].closed, timeout=3, message="node closed")
    assert recorder.requests("hold")[0].closed - left < 2.0
    # After the first byte: a stream.
    stream = Stream(router, api_key, {"model": "gone/drip"})
    assert stream.event() is not None
    stream.close()
    wait_until(lambda: recorder.requests("drip")[0].closed, timeout=3, message="stream closed")


def test_queued_requests_of_clients_that_left_are_dropped(router, api_key, beats, recorder):
    body = {"node_id": "rec-one", "url": f"{recorder.url}/hold", "slots": 1}
    reply = call(router, "POST", "/v0/nodes", ADMIN, {**body, "models": ready("gone/queued")})
    assert reply.status in (200, 201)
    beats.bodies["rec-one"] = {"slots": 1, "models": ready("gone/queued")}
    first = Stream(router, api_key, {"model": "gone/queued"})  # takes the only slot
    wait_until(lambda: recorder.requests("hold"), timeout=5, message="first request")
    queued = [Stream(router, api_key, {"model": "gone/queued"}) for _ in range(3)]
    wait_until(lambda: metric(router, "llmlb_proxy_queued") == 3, timeout=5, message="3 queued")
    for stream in queued:
        stream.close()
    wait_until(lambda: metric(router, "llmlb_proxy_queued") == 0, timeout=5, message="dropped")
    first.close()  # the slot is free again: nobody is left to take it
    wait_until(lambda: recorder.requests("hold")[0].closed, timeout=3, message="first closed")
    wait_until(lambda: metric(router, "llmlb_proxy_inflight") == 0, timeout=5, message="idle")
    assert len(recorder.requests("hold")) == 1


def test_total_time_out_cancels_the_node_request(router, api_key, beats, recorder):
    beats.register("rec-slow", f"{recorder.url}/hold", ready("gone/slow"))
    wait_until(lambda: chat(router, api_key, "gone/slow", timeout=10).status == 504, timeout=12)
    conn = recorder.requests("hold")[-1]
    wait_until(lambda: conn.closed, timeout=2, message="node request cancelled")
    assert 3.5 < conn.closed - conn.opened < 5.5


# -- 9: hung and vanished nodes --------------------------------------------------------------


def test_stream_from_a_stopped_node_ends_after_the_idle_time_out(router, api_key, beats, spawn):
    proc, base = start_mock(spawn, "stopped")
    beats.register("stopped", f"{base}/_mock/stopped/drip500", ready("hung/stopped"))
    wait_routed(router, api_key, "hung/stopped")
    stream = Stream(router, api_key, {"model": "hung/stopped"})
    try:
        assert stream.event() is not None
        proc.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        events = stream.rest()
        assert time.monotonic() - stopped < 2.5  # the 1 s idle time-out, not the node's pace
        error = orjson.loads(events[-1])["error"]
        assert error["code"] == "upstream_error" and "stopped" in error["message"]
        assert b"[DONE]" not in events  # the error event ends the stream
    finally:
        proc.signal(signal.SIGCONT)
        stream.close()


def test_streams_to_a_node_marked_offline_end_at_once(router, api_key, beats, recorder):
    beats.register("rec-vanish", f"{recorder.url}/drip", ready("hung/vanish"))
    stream = Stream(router, api_key, {"model": "hung/vanish"})
    try:
        assert stream.event() is not None
        beats.stop("rec-vanish")  # silent: offline after 3 missed heartbeats (1.5 s)
        silent = time.monotonic()
        events = stream.rest()  # the node itself keeps sending
        assert time.monotonic() - silent < 3.0
        error = orjson.loads(events[-1])["error"]
        assert error["code"] == "upstream_error" and "offline" in error["message"]
        assert b"[DONE]" not in events
        wait_until(lambda: recorder.requests("drip")[-1].closed, timeout=2)
    finally:
        stream.close()


# -- 11: models no node can serve ------------------------------------------------------------


def test_model_no_node_can_serve_is_not_routed(router, api_key, beats, mock):
    model = "acme/safetensors-only"
    report = ready(model, format="safetensors", servable=False)
    beats.register("llama-only", f"{mock}/_mock/llama-only/ok", report, runtimes=["llama.cpp"])
    wait_until(lambda: chat(router, api_key, model).status == 503, timeout=5)
    reply = chat(router, api_key, model)
    error = reply.json["error"]
    assert error["code"] == "no_capable_node", reply.body
    assert "safetensors" in error["message"] and "llama.cpp" in error["message"]
    assert reply.headers.get("retry-after")
    listed = call(router, "GET", f"/v1/models/{model}", api_key).json
    assert listed["ready"] is False
    stats = orjson.loads(call(mock, "GET", "/_stats").body)
    assert "llama-only" not in stats  # never routed there
    # A node that reports no "servable" (an older node) counts as able to serve it.
    beats.register("older", f"{mock}/_mock/older/ok", ready(model))
    wait_routed(router, api_key, model)
    assert call(router, "GET", f"/v1/models/{model}", api_key).json["ready"] is True
    assert "llama-only" not in orjson.loads(call(mock, "GET", "/_stats").body)
