"""Tests of llmlb.router.proxy.upstream: the proxy's HTTP/1.1 node client against raw loopback
servers that answer with hand-written bytes (split at awkward places), so every framing
is exercised."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from llmlb.router.proxy.upstream import ConnectError, Disconnected, NodePool, UpstreamTimeout

from tests.procs import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (the client always sends Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def pool(url: str, read_timeout: float = 5.0) -> NodePool:
    return NodePool(url, connect_timeout=2.0, read_timeout=read_timeout)


async def write_slowly(writer: asyncio.StreamWriter, data: bytes, step: int = 3) -> None:
    """Send ``data`` a few bytes at a time, so the parser sees every split point."""
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(0)


def test_content_length_answer_and_keep_alive_reuse():
    connections = []
    requests = []

    async def handler(reader, writer):
        connections.append(writer)
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            requests.append((head, body))
            answer = b'{"ok":true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Node: a\r\n"
                b"Content-Length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer
            )
        writer.close()

    async def scenario():
        server, url = await serve(handler)
        client = pool(url + "/prefix/")
        for i in range(3):
            resp = await client.request(b"POST", "/v1/chat/completions", b'{"n":%d}' % i)
            assert resp.status == 200
            assert resp.header(b"content-type") == b"application/json"
            assert (b"x-node", b"a") in resp.headers  # names lowercased, values as sent
            assert await resp.read() == b'{"ok":true}'
            assert resp.at_eof()
            resp.release()
        assert len(connections) == 1  # one keep-alive connection served all three
        head, body = requests[2]
        assert head.startswith(b"POST /prefix/v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in head and b"Content-Type: application/json" in head
        assert body == b'{"n":2}'
        await client.close()
        server.close()

    asyncio.run(scenario())


def _chunked_stream(events: list[bytes], extension: bytes = b"", trailer: bytes = b"") -> bytes:
    """An event-stream answer with each event in its own chunk."""
    wire = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for event in events:
        wire += b"%x%s\r\n" % (len(event), extension) + event + b"\r\n"
    return wire + b"0\r\n" + trailer + b"\r\n"


def test_chunked_answer_split_anywhere_is_decoded_piece_by_piece():
    events = [b"data: %d\n\n" % i for i in range(5)]
    wire = _chunked_stream(events, extension=b";ext=1", trailer=b"X-Trailer: t\r\n")

    async def handler(reader, writer):
        await read_request(reader)
        await write_slowly(writer, wire)
        await read_request(reader)  # the connection is reusable after the last chunk
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def scenario():
        server, url = await serve(handler)
        client = pool(url)
        resp = await client.request(b"POST", "/v1/completions", b"{}")
        pieces = [piece async for piece in resp]
        assert b"".join(pieces) == b"".join(events)
        assert len(pieces) > 1  # relayed as it arrived, not buffered whole
        resp.release()
        resp = await client.request(b"POST", "/v1/completions", b"{}")
        assert resp.status == 204 and await resp.read() == b""
        resp.release()
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_a_chunked_answer_arriving_in_one_read_is_decoded_whole():
    """Head, every chunk and the trailer in one buffer (a quick node's whole stream): the
    parser walks it in one pass and leaves the connection reusable."""
    events = [b"data: %d %s\n\n" % (i, b"x" * i) for i in range(40)]
    wire = _chunked_stream(events)

    async def handler(reader, writer):
        for _ in range(2):
            await read_request(reader)
            writer.write(wire)
            await writer.drain()

    async def scenario():
        server, url = await serve(handler)
        client = pool(url)
        for _ in range(2):  # the second answer on the same, reused connection
            resp = await client.request(b"POST", "/v1/completions", b"{}")
            assert resp.status == 200
            assert await resp.read() == b"".join(events)
            assert resp.at_eof()
            resp.release()
        assert len(client._idle) == 1
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_body_until_close_and_connection_close_are_not_reused():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await read_request(reader)
        if len(connections) == 1:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")  # no length: ends at close
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def scenario():
        server, url = await serve(handler)
        client = pool(url)
        resp = await client.request(b"POST", "/x", b"{}")
        assert await resp.read() == b"all of it"
        resp.release()
        resp = await client.request(b"POST", "/x", b"{}")
        assert await resp.read() == b"ok"
        resp.release()
        resp = await client.request(b"POST", "/x", b"{}")
        assert await resp.read() == b"ok"
        resp.release()
        assert len(connections) == 3
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await read_request(reader)
        if len(connections) == 2:  # a node that drops requests on one connection
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if len(connections) == 1:  # keep-alive promised, but the next request finds it dead
            await read_request(reader)
            writer.close()

    async def scenario():
        server, url = await serve(handler)
        client = pool(url)
        resp = await client.request(b"POST", "/x", b"{}")
        assert await resp.read() == b"ok"
        resp.release()
        with pytest.raises(Disconnected):  # stale one, then a fresh one that drops it too
            await client.request(b"POST", "/x", b"{}")
        assert len(connections) == 2
        resp = await client.request(b"POST", "/x", b"{}")  # fresh connections work
        assert await resp.read() == b"ok"
        resp.release()
        await client.close()
        server.close()

    asyncio.run(scenario())


def test_errors_are_typed():
    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def stalls_mid_body(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def scenario():
        with pytest.raises(ConnectError):
            await pool(f"http://127.0.0.1:{free_port()}").request(b"POST", "/x", b"{}")
        with pytest.raises(ConnectError):
            await pool("ftp://nowhere").request(b"POST", "/x", b"{}")
        server, url = await serve(silent)
        with pytest.raises(UpstreamTimeout):
            await pool(url, read_timeout=0.2).request(b"POST", "/x", b"{}")
        server.close()
        server, url = await serve(garbage)
        with pytest.raises(Disconnected, match="status line"):
            await pool(url).request(b"POST", "/x", b"{}")
        server.close()
        server, url = await serve(stalls_mid_body)
        resp = await pool(url, read_timeout=0.2).request(b"POST", "/x", b"{}")
        assert await resp.read_some() == b"abc"
        with pytest.raises(UpstreamTimeout):
            await resp.read_some()
        resp.release()
        server.close()

    asyncio.run(scenario())


def test_close_wakes_a_pending_read():
    async def stalls(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(5)

    async def scenario():
        server, url = await serve(stalls)
        resp = await pool(url).request(b"POST", "/x", b"{}")
        assert await resp.read_some() == b"ab"
        reading = asyncio.ensure_future(resp.read_some())
        await asyncio.sleep(0)  # the read is waiting for data now
        resp.close()
        with pytest.raises(Disconnected):
            await asyncio.wait_for(reading, 1.0)
        server.close()

    asyncio.run(scenario())


def test_read_timeout_can_change_and_abort_all_ends_requests_in_progress():
    arrived = asyncio.Event()

    async def stalls(reader, writer):
        head, _ = await read_request(reader)
        if b"/head" in head:
            arrived.set()
            await asyncio.sleep(5)  # never answers
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def scenario():
        server, url = await serve(stalls)
        nodes = pool(url, read_timeout=5.0)
        resp = await nodes.request(b"POST", "/x", b"{}")
        assert await resp.read_some() == b"ab"
        resp.read_timeout = 0.1  # e.g. the idle time-out once a stream started
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(resp.read_some(), 2.0)
        resp.release()
        assert not nodes.busy
        streaming = await nodes.request(b"POST", "/x", b"{}")
        assert await streaming.read_some() == b"ab"
        reading = asyncio.ensure_future(streaming.read_some())
        waiting = asyncio.ensure_future(nodes.request(b"POST", "/head", b"{}"))
        await asyncio.wait_for(arrived.wait(), 2.0)  # the node holds the request now
        assert nodes.busy
        nodes.abort_all("node n1 went offline")
        for pending in (reading, waiting):
            with pytest.raises(Disconnected, match="went offline") as raised:
                await asyncio.wait_for(pending, 1.0)
            assert raised.value.sent  # the node had the request
        assert nodes.closed and not nodes.busy
        with pytest.raises(Disconnected) as raised:  # a closed pool makes no new connection
            await nodes.request(b"POST", "/x", b"{}")
        assert not raised.value.sent
        server.close()

    asyncio.run(scenario())


def test_failures_say_whether_the_request_reached_the_node():
    """A request that never left the router may go to another node; one a node held may not."""

    async def hangs_up(reader, writer):
        await read_request(reader)
        writer.close()

    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    async def scenario():
        with pytest.raises(ConnectError) as refused:
            await pool(f"http://127.0.0.1:{free_port()}").request(b"POST", "/x", b"{}")
        assert not refused.value.sent
        server, url = await serve(hangs_up)
        with pytest.raises(Disconnected) as lost:
            await pool(url).request(b"POST", "/x", b"{}")
        assert lost.value.sent
        server.close()
        server, url = await serve(silent)
        with pytest.raises(UpstreamTimeout) as late:
            await pool(url, read_timeout=0.2).request(b"POST", "/x", b"{}")
        assert late.value.sent
        server.close()

    asyncio.run(scenario())


def test_a_kept_alive_connection_times_reads_by_the_current_wait():
    """One timer per connection outlives each wait: a timer armed by an earlier, shorter wait
    does not end a later, longer one early, and a shorter one still ends on time."""
    answered = []
    connections = []

    async def answers_late(reader, writer):
        connections.append(writer)
        while True:
            try:
                head, _ = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if b"/late" in head:
                await asyncio.sleep(0.5)
            if b"/never" in head:
                await asyncio.sleep(5)
            answered.append(head.split(b" ")[1])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def scenario():
        server, url = await serve(answers_late)
        nodes = pool(url, read_timeout=0.3)
        resp = await nodes.request(b"POST", "/now", b"{}")  # arms the timer at +0.3 s
        assert await resp.read() == b"ok"
        resp.release()
        nodes.read_timeout = 2.0
        started = asyncio.get_running_loop().time()
        resp = await nodes.request(b"POST", "/late", b"{}")  # same connection, 0.5 s answer
        assert await resp.read() == b"ok"
        assert asyncio.get_running_loop().time() - started >= 0.45
        resp.release()
        assert answered == [b"/now", b"/late"] and len(connections) == 1
        nodes.read_timeout = 0.2
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(nodes.request(b"POST", "/never", b"{}"), 3.0)
        assert asyncio.get_running_loop().time() - started < 1.5  # not the 2 s armed before
        server.close()

    asyncio.run(scenario())
