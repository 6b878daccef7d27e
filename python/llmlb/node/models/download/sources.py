"""One file's ranges fetched from several sources at once: peers first, the hub for what
they cannot supply or when they are slow (runs inside a transfer worker child,
:mod:`.workers`).

Job (``"kind": "sources"``): ``path``, ``size``, ``chunk_size``, ``sources`` (each ``url``,
``headers``, ``connections``, ``role``: ``peer`` or ``hub``), ``hub_after_s`` and
``min_peer_rate`` (bytes/s). Each connection is a thread that takes the next chunk from one
shared queue, so a faster source takes more of the file. Hub connections start only once no
peer is left, or when after ``hub_after_s`` the peers together deliver less than
``min_peer_rate``. A source that refuses (401/403/404/416), or fails three times in a row, is
dropped and its chunk goes back to the queue. Redirects are never followed: the parent hands
over URLs it already resolved against the allowlist. Bytes land with ``pwrite`` at their
offset (the parent's hasher follows the written prefix); the parent verifies size and sha256.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

FATAL_STATUSES = frozenset({400, 401, 403, 404, 410, 416})
MAX_FAILURES = 3  # in a row, before a source is dropped


class SourceFailed(Exception):
    """A chunk could not be fetched from a source (``fatal``: never ask that source again)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class TransferFailed(Exception):
    """Every source was dropped with chunks left; ``detail`` is the per-source summary."""

    def __init__(self, message: str, detail: list[dict]):
        super().__init__(message)
        self.detail = detail


@dataclass
class _Source:
    url: str
    headers: dict[str, str]
    connections: int
    role: str
    bytes: int = 0
    failures: int = 0
    dead: bool = False
    error: str | None = None
    _parts: urllib.parse.SplitResult = field(init=False)

    def __post_init__(self) -> None:
        self.connections = max(1, self.connections)
        self._parts = urllib.parse.urlsplit(self.url)

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        parts = self._parts
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname or "", parts.port, timeout=timeout)

    @property
    def target(self) -> str:
        parts = self._parts
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def summary(self) -> dict:
        return {
            "url": self.url,
            "role": self.role,
            "bytes": self.bytes,
            "dead": self.dead,
            "error": self.error,
        }


class _Transfer:
    def __init__(self, job: dict, progress: Callable[[int], None]):
        self.path = job["path"]
        self.size = int(job["size"])
        chunk = max(1, int(job["chunk_size"]))
        self.sources = [
            _Source(src["url"], src.get("headers") or {}, int(src["connections"]), src["role"])
            for src in job["sources"]
        ]
        self.hub_after_s = float(job.get("hub_after_s", 3.0))
        self.min_peer_rate = float(job.get("min_peer_rate", 0.0))
        self.timeout = float(job.get("timeout_s", 30.0))
        self.progress = progress
        self.queue: deque[tuple[int, int]] = deque(
            (start, min(start + chunk, self.size)) for start in range(0, self.size, chunk)
        )
        self.remaining = len(self.queue)
        self.cond = threading.Condition()
        self.hub_go = threading.Event()
        self.started = time.monotonic()
        if not any(s.role == "peer" for s in self.sources):
            self.hub_go.set()
        self.fd = -1

    # -- the run --------------------------------------------------------------------------

    def run(self) -> list[dict]:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if self.size == 0:
                return [s.summary() for s in self.sources]
            threads = [
                threading.Thread(target=self._lane, args=(source,), daemon=True)
                for source in self.sources
                for _ in range(source.connections)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            os.close(self.fd)
        detail = [s.summary() for s in self.sources]
        if self.remaining:
            errors = "; ".join(f"{s.role} {s.url}: {s.error}" for s in self.sources if s.error)
            raise TransferFailed(f"no source left for {self.remaining} chunk(s): {errors}", detail)
        return detail

    def _alive(self, role: str) -> bool:
        return any(s.role == role and not s.dead for s in self.sources)

    def _next(self, source: _Source) -> tuple[int, int] | None:
        """The next chunk for ``source``; ``None`` when it should stop."""
        with self.cond:
            while True:
                if source.dead or self.remaining == 0:
                    return None
                if source.role == "hub" and not self.hub_go.is_set():
                    self._maybe_start_hub()
                    if not self.hub_go.is_set():
                        self.cond.wait(0.2)
                        continue
                if self.queue:
                    return self.queue.popleft()
                if not self._alive("peer") and not self._alive("hub"):
                    return None
                self.cond.wait(0.2)  # chunks in flight elsewhere may come back

    def _maybe_start_hub(self) -> None:
        elapsed = time.monotonic() - self.started
        if not self._alive("peer"):
            self.hub_go.set()
        elif self.min_peer_rate > 0 and elapsed >= self.hub_after_s:
            peer_bytes = sum(s.bytes for s in self.sources if s.role == "peer")
            if peer_bytes / elapsed < self.min_peer_rate:
                self.hub_go.set()

    def _lane(self, source: _Source) -> None:
        conn: http.client.HTTPConnection | None = None
        buf = bytearray()
        try:
            while (chunk := self._next(source)) is not None:
                start, end = chunk
                if len(buf) < end - start:
                    buf = bytearray(end - start)
                try:
                    if conn is None:
                        conn = source.connect(self.timeout)
                    self._fetch(conn, source, start, end, buf)
                except (SourceFailed, OSError, http.client.HTTPException) as exc:
                    if conn is not None:
                        conn.close()
                        conn = None
                    self._failed(source, chunk, exc)
                    continue
                with self.cond:
                    source.bytes += end - start
                    source.failures = 0
                    self.remaining -= 1
                    self.cond.notify_all()
                self.progress(end - start)
        finally:
            if conn is not None:
                conn.close()

    def _failed(self, source: _Source, chunk: tuple[int, int], exc: BaseException) -> None:
        with self.cond:
            self.queue.appendleft(chunk)
            source.failures += 1
            source.error = str(exc) or type(exc).__name__
            if getattr(exc, "fatal", False) or source.failures >= MAX_FAILURES:
                source.dead = True
                if not self._alive("peer"):
                    self.hub_go.set()
            self.cond.notify_all()
        if not source.dead:
            time.sleep(0.1 * source.failures)

    def _fetch(
        self,
        conn: http.client.HTTPConnection,
        source: _Source,
        start: int,
        end: int,
        buf: bytearray,
    ) -> None:
        headers = {**source.headers, "Range": f"bytes={start}-{end - 1}"}
        conn.request("GET", source.target, headers=headers)
        resp = conn.getresponse()
        if resp.status != 206:
            resp.read()
            fatal = resp.status in FATAL_STATUSES or 300 <= resp.status < 400
            raise SourceFailed(f"HTTP {resp.status} for bytes {start}-{end - 1}", fatal=fatal)
        view = read_range(resp, buf, start, end, self.size, wrong_range_fatal=True)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], start + written)


def read_range(
    resp: http.client.HTTPResponse,
    buf: bytearray,
    start: int,
    end: int,
    size: int,
    *,
    wrong_range_fatal: bool,
) -> memoryview:
    """Read a 206 answer's bytes ``start`` to ``end - 1`` of a ``size``-byte file into ``buf``;
    returns the view of ``buf`` they fill.

    Raises:
        SourceFailed: the answer's Content-Range is another range (``fatal`` as
            ``wrong_range_fatal`` says), or the connection closed before the last byte.
    """
    expected = f"bytes {start}-{end - 1}/{size}"
    if (resp.getheader("Content-Range") or "").strip() != expected:
        resp.read()
        raise SourceFailed(
            f"Content-Range {resp.getheader('Content-Range')!r} != {expected!r}",
            fatal=wrong_range_fatal,
        )
    view = memoryview(buf)[: end - start]
    got = 0
    while got < len(view):
        n = resp.readinto(view[got:])
        if not n:
            raise SourceFailed(f"connection closed after {got} of {end - start} bytes")
        got += n
    return view


def run_sources(job: dict, progress: Callable[[int], None]) -> list[dict]:
    """Fetch one file's ranges as ``job`` describes; returns the per-source summary
    (``url``, ``role``, ``bytes``, ``dead``, ``error``).

    Raises:
        TransferFailed: every source was dropped before the file was complete.
    """
    return _Transfer(job, progress).run()
