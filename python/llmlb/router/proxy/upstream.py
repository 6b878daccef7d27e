"""A lean HTTP/1.1 client for the proxy's node connections: a keep-alive pool per node.

The proxy sends each request's bytes unchanged to a node and relays the answer, so it needs
little of a general HTTP client: one request at a time per connection, a ``Content-Length``
body, and answers with a length, chunked or ending at close. Doing only that on an
``asyncio.Protocol`` costs a fraction of ``aiohttp.ClientSession``'s per-request CPU (request
and response objects, header multidicts, tracing, timers), which dominated the router's own
time per proxied request.

Failures raise :mod:`.upstream_errors`: ``ConnectError`` (no connection), ``UpstreamTimeout``
(connect, first byte, or a silence longer than the read timeout), ``Disconnected`` (the node
hung up or broke the protocol).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from time import monotonic
from urllib.parse import urlsplit

from llmlb.router.proxy.upstream_errors import (
    LOCAL_ERRNOS,
    ConnectError,
    Disconnected,
    UpstreamError,
    UpstreamTimeout,
    unsent,
)

_MAX_HEAD_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 4096
_HIGH_WATER = 256 * 1024  # decoded bytes buffered before reading from the node pauses
_MAX_IDLE = 1024  # idle keep-alive connections kept per node
# Answer headers not relayed to the client: hop-by-hop ones, and those the ASGI server sets
# itself (Response.relayed leaves them out, sorted out while the head is parsed).
RELAY_DROPPED = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"proxy-connection", b"server", b"date",
})  # fmt: skip

# Parser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the incremental parser of the answer it is receiving."""

    __slots__ = (
        "_loop",
        "transport",
        "_buf",
        "_state",
        "_remaining",
        "_expect_body",
        "pieces",
        "_pending",
        "_paused",
        "head",
        "complete",
        "received",
        "error",
        "closed",
        "reusable",
        "idle_since",
        "_waiter",
        "_deadline",
        "_timer",
        "_timer_at",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[bool] | None = None
        # One timer per connection, armed lazily (see wait): no timer per read.
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.reset(True)

    def reset(self, expect_body: bool) -> None:
        """Prepare for the answer to a new request."""
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0
        self._expect_body = expect_body
        self.pieces: deque[bytes] = deque()
        self._pending = 0
        self._paused = False
        # status, headers, the headers to relay, the first Content-Type (b"" when none)
        self.head: tuple[int, list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], bytes] | None
        self.head = None
        self.complete = False
        self.received = False
        self.error: UpstreamError | None = None
        self.reusable = True

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._buf = self._buf + data if self._buf else data
        try:
            self._parse()
        except Disconnected as exc:
            self.error = exc
            self.reusable = False
            self.abort()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state == _UNTIL_CLOSE:
            self._finish()
        elif not self.complete and self.error is None:
            reason = f": {exc}" if exc else ""
            self.error = Disconnected(f"connection closed before the answer ended{reason}")
        self._wake()

    # -- parser ---------------------------------------------------------------------------

    def _parse(self) -> None:
        """Decode what the buffer holds; a position moves through it and only the pieces of
        body are sliced out (slicing the rest off at each step copied a stream's buffer once
        per chunk)."""
        buf = self._buf
        size = len(buf)
        pos = 0
        try:
            while pos < size:
                state = self._state
                if state == _HEAD:
                    end = buf.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if size - pos > _MAX_HEAD_BYTES:
                            raise Disconnected("answer headers too large")
                        return
                    head, pos = buf[pos:end], end + 4
                    self._head(head)
                elif state in (_LENGTH, _CHUNK_DATA):
                    remaining = self._remaining
                    if size - pos <= remaining:
                        piece, pos = buf[pos:] if pos else buf, size
                    else:
                        piece, pos = buf[pos : pos + remaining], pos + remaining
                    self._push(piece)
                    self._remaining = remaining = remaining - len(piece)
                    if not remaining:
                        if state == _LENGTH:
                            self._finish()
                        else:
                            self._state = _CHUNK_END
                elif state == _CHUNK_SIZE:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        if size - pos > _MAX_CHUNK_LINE:
                            raise Disconnected("chunk size line too long")
                        return
                    try:
                        chunk = int(buf[pos:end].split(b";", 1)[0], 16)
                    except ValueError:
                        raise Disconnected("invalid chunk size") from None
                    pos = end + 2
                    if chunk:
                        self._remaining = chunk
                        self._state = _CHUNK_DATA
                    else:
                        self._state = _TRAILER
                elif state == _CHUNK_END:
                    if size - pos < 2:
                        return
                    if buf[pos : pos + 2] != b"\r\n":
                        raise Disconnected("chunk not followed by CRLF")
                    pos += 2
                    self._state = _CHUNK_SIZE
                elif state == _TRAILER:
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        if size - pos > _MAX_HEAD_BYTES:
                            raise Disconnected("trailers too large")
                        return
                    line_start, pos = pos, end + 2
                    if end == line_start:
                        self._finish()
                elif state == _UNTIL_CLOSE:
                    self._push(buf[pos:] if pos else buf)
                    pos = size
                else:  # _DONE: bytes beyond the answer; never reuse this connection
                    pos = size
                    self.reusable = False
        finally:
            self._buf = b"" if pos >= size else buf[pos:] if pos else buf

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise Disconnected(f"invalid status line {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            return  # informational: the real answer follows
        headers = []
        relayed = []
        content_type = None
        length = None
        chunked = False
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise Disconnected("invalid header line")
            name = name.strip().lower()
            value = value.strip()
            pair = (name, value)
            headers.append(pair)
            if name not in RELAY_DROPPED:
                relayed.append(pair)
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"content-length":
                if not value.isdigit():
                    raise Disconnected("invalid content-length")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                token = value.lower()
                if b"close" in token:
                    keep_alive = False
                elif b"keep-alive" in token:
                    keep_alive = True
        self.head = (status, headers, relayed, b"" if content_type is None else content_type)
        self.reusable = keep_alive
        if not self._expect_body or status == 204 or status == 304:
            self._finish()
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if not length:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE
            self.reusable = False

    def _push(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self._pending += len(piece)
        if self._pending > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _finish(self) -> None:
        self._state = _DONE
        self.complete = True

    # -- consumer side --------------------------------------------------------------------

    def take(self) -> bytes:
        """Everything decoded so far, as one piece (empty if nothing is buffered)."""
        pieces = self.pieces
        piece = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._pending = 0
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return piece

    async def wait(self, timeout: float) -> None:
        """Wait for more data, the end of the connection or ``timeout`` seconds.

        The connection's one timer stays armed across waits and is moved only when a wait
        ends earlier than it is set for; when it fires early it re-arms for the current
        deadline (a timer per read cost more than the rest of a short answer's relay).

        Raises:
            UpstreamTimeout: nothing happened within ``timeout``.
        """
        loop = self._loop
        deadline = self._deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._expire)
        waiter = self._waiter = loop.create_future()
        try:
            arrived = await waiter
        finally:
            self._waiter = None
        if not arrived:
            raise UpstreamTimeout(f"no data from the node for {timeout:g} s")

    def _expire(self) -> None:
        """The timer fired: end a wait past its deadline, re-arm for one still running, and
        stay disarmed while nothing waits."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._loop.time() >= self._deadline:
            waiter.set_result(False)
        else:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._expire)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def abort(self) -> None:
        """Close the connection now (its answer is abandoned)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Response:
    """A node's answer: status and headers, then the body as it arrives.

    Attributes:
        status: the HTTP status.
        headers: ``(lowercased name, value)`` byte pairs, in the node's order.
        relayed: those of them a proxy passes on (not :data:`RELAY_DROPPED`), a new list.
        content_type: the first ``Content-Type`` (``b""`` when there is none).
    """

    __slots__ = ("status", "headers", "relayed", "content_type", "read_timeout", "_conn", "_pool")

    def __init__(self, conn: _Connection, pool: NodePool, timeout: float):
        self.status, self.headers, self.relayed, self.content_type = conn.head  # type: ignore[misc]
        self._conn = conn
        self._pool = pool
        self.read_timeout = timeout  # longest silence of the node; may be changed while reading

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lowercase), if present."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def at_eof(self) -> bool:
        """True when the whole body has been read."""
        conn = self._conn
        return conn.complete and not conn.pieces

    async def read_some(self) -> bytes:
        """The body bytes available now, waiting for some if none are; ``b""`` at the end.

        Raises:
            UpstreamTimeout: the node stayed silent longer than the read timeout.
            Disconnected: the connection ended before the body did.
        """
        conn = self._conn
        while not conn.pieces:
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait(self.read_timeout)
        return conn.take()

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while piece := await self.read_some():
            parts.append(piece)
        return b"".join(parts)

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        piece = await self.read_some()
        if not piece:
            raise StopAsyncIteration
        return piece

    def release(self) -> None:
        """Give the connection back to the pool when the answer was read whole, else close it."""
        conn = self._conn
        self._pool._busy.discard(conn)
        if conn.complete and conn.reusable and not conn.closed and not conn.pieces:
            self._pool._release(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Abandon the answer and close the connection (wakes a pending read)."""
        conn = self._conn
        conn.abort()
        if conn.error is None and not conn.complete:
            conn.error = Disconnected("answer abandoned")
        conn._wake()


class NodePool:
    """Keep-alive HTTP/1.1 connections to one node.

    Args:
        url: the node's base URL (``http://host:port[/prefix]``; ``https`` works too).
        connect_timeout: seconds to establish a connection.
        read_timeout: longest wait for the answer's head, and for each further piece of it.
        keepalive_s: idle connections older than this are closed instead of reused.
        token: sent as ``Authorization: Bearer <token>`` on every request, when given.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_s: float = 30.0,
        token: str | None = None,
    ):
        self.url = url
        self.token = token
        self._auth_header = b"\r\nAuthorization: Bearer " + token.encode() if token else b""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = urlsplit(""), None
        # An unusable URL fails each request as a connect error (the node is unreachable).
        self._invalid = parts.scheme not in ("http", "https") or not parts.hostname
        self._host = parts.hostname or ""
        self._port = port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = (host if default_port else f"{host}:{self._port}").encode("idna")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()  # connections with a request in progress
        self._heads: dict[tuple[bytes, str], bytes] = {}
        self._closed = False

    def _request_head(self, method: bytes, path: str) -> bytes:
        """Request line and fixed headers up to ``Content-Length: `` (built once per route)."""
        key = (method, path)
        head = self._heads.get(key)
        if head is None:
            target = (self._prefix + path).encode("latin-1")
            head = self._heads[key] = (
                method + b" " + target + b" HTTP/1.1\r\nHost: " + self._host_header
                + self._auth_header
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
            )  # fmt: skip
        return head

    async def request(
        self, method: bytes, path: str, body: bytes = b"", extra_headers: bytes = b""
    ) -> Response:
        """Send ``body`` (JSON) to ``path`` on the node and wait for the answer's head.

        Args:
            method: ``b"POST"``, ``b"GET"``...
            path: the route, appended to the node URL's own path.
            body: the request body, sent as it is with ``Content-Type: application/json``.
            extra_headers: more header lines, each ending in CRLF (e.g. the priority).

        Raises:
            ConnectError: no connection could be made.
            UpstreamTimeout: connect or answer head timed out.
            Disconnected: the node hung up before answering (after one retry on a fresh
                connection when a reused keep-alive connection turned out to be stale).
        """
        data = (
            self._request_head(method, path) + str(len(body)).encode() + b"\r\n"
            + extra_headers + b"\r\n" + body
        )  # fmt: skip
        expect_body = method != b"HEAD"
        conn = self._acquire()
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            conn.reset(expect_body)
            conn.transport.write(data)  # type: ignore[union-attr]
            self._busy.add(conn)
            try:
                while conn.head is None:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(self.read_timeout)
            except Disconnected:
                self._busy.discard(conn)
                conn.abort()
                if reused and not conn.received and not self._closed:
                    conn = None  # stale keep-alive connection: once more on a fresh one
                    continue
                raise
            except BaseException:
                self._busy.discard(conn)
                conn.abort()
                raise
            return Response(conn, self, self.read_timeout)

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`abort_all`: make a new pool to reach the node."""
        return self._closed

    @property
    def busy(self) -> bool:
        """True while some request on this pool is in progress."""
        return bool(self._busy)

    def abort_all(self, reason: str) -> None:
        """Close the pool and end every request in progress with ``Disconnected(reason)``
        (waking their pending reads), e.g. because the node went offline."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
        busy, self._busy = self._busy, set()
        for conn in busy:
            if conn.error is None and not conn.complete:
                conn.error = Disconnected(reason)
            conn.abort()
            conn._wake()

    def _acquire(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                if monotonic() - conn.idle_since < self.keepalive_s:
                    return conn
                conn.abort()
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle
        if self._closed or len(idle) >= _MAX_IDLE:
            conn.abort()
            return
        now = conn.idle_since = monotonic()
        while idle and (idle[0].closed or now - idle[0].idle_since >= self.keepalive_s):
            idle.popleft().abort()
        idle.append(conn)

    async def _connect(self) -> _Connection:
        if self._invalid:
            raise ConnectError(f"unsupported node URL {self.url!r}")
        if self._closed:
            raise unsent(Disconnected(f"the connection pool to {self.url} is closed"))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port, ssl=self._ssl
                )
        except TimeoutError:
            message = f"connect timed out after {self.connect_timeout:g} s"
            raise unsent(UpstreamTimeout(message)) from None
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:  # the router's own shortage says nothing of the node
                message = f"cannot open a connection to {self.url}: {exc}"
                raise unsent(Disconnected(message)) from exc
            raise ConnectError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return conn

    async def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
