"""Multi-source range transfers (:mod:`llmlb.node.models.download.sources`) against loopback HTTP
servers: the hub takes over from a peer that dies or refuses, joins a slow one, and a
transfer with no source left fails naming them."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from llmlb.node.models.download.sources import (
    SourceFailed,
    TransferFailed,
    read_range,
    run_sources,
)

DATA = os.urandom(3 << 20)
CHUNK = 256 << 10
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


class Server:
    """Serves ``DATA`` ranges; ``status`` answers everything with it, ``serve`` ranges only
    that many requests (then 500), ``delay`` slows each answer."""

    def __init__(self, status: int | None = None, serve: int | None = None, delay: float = 0):
        self.status, self.serve, self.delay, self.requests = status, serve, delay, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server.requests += 1
                time.sleep(server.delay)
                failing = server.serve is not None and server.requests > server.serve
                if server.status or failing:
                    self.send_response(server.status or 500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                match = _RANGE.fullmatch(self.headers["range"])
                start, end = int(match[1]), int(match[2]) + 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(DATA)}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                self.wfile.write(DATA[start:end])

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/file"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.close()


def _job(tmp_path, *sources, min_peer_rate: float = 0.0) -> dict:
    return {
        "path": str(tmp_path / "out.part"),
        "size": len(DATA),
        "chunk_size": CHUNK,
        "sources": [
            {"url": s.url, "headers": {}, "connections": 2, "role": role} for s, role in sources
        ],
        "hub_after_s": 0.2,
        "min_peer_rate": min_peer_rate,
        "timeout_s": 5,
    }


def _by_role(summary: list[dict]) -> dict[str, int]:
    return {s["role"]: s["bytes"] for s in summary}


def test_a_peer_supplies_every_byte_while_it_can(tmp_path, servers):
    peer, hub = Server(), Server()
    servers += [peer, hub]
    counted = []
    summary = run_sources(_job(tmp_path, (peer, "peer"), (hub, "hub")), counted.append)
    assert (tmp_path / "out.part").read_bytes() == DATA
    assert _by_role(summary) == {"peer": len(DATA), "hub": 0} and hub.requests == 0
    assert sum(counted) == len(DATA)


def test_the_hub_takes_over_from_a_peer_that_dies_or_refuses(tmp_path, servers):
    dying, refusing, hub = Server(serve=3), Server(status=401), Server()
    servers += [dying, refusing, hub]
    summary = run_sources(_job(tmp_path, (dying, "peer"), (hub, "hub")), lambda n: None)
    assert (tmp_path / "out.part").read_bytes() == DATA
    roles = _by_role(summary)
    # the peer served what it could before dying (the hub may already have taken a chunk
    # it was about to serve), the hub all the rest
    assert 0 < roles["peer"] <= 3 * CHUNK and roles["peer"] + roles["hub"] == len(DATA)
    assert summary[0]["dead"] and "HTTP 500" in summary[0]["error"]
    (tmp_path / "out.part").unlink()
    summary = run_sources(_job(tmp_path, (refusing, "peer"), (hub, "hub")), lambda n: None)
    assert _by_role(summary)["hub"] == len(DATA) and refusing.requests <= 2  # never retried


def test_the_hub_joins_a_slow_peer(tmp_path, servers):
    slow, hub = Server(delay=0.15), Server()
    servers += [slow, hub]
    job = _job(tmp_path, (slow, "peer"), (hub, "hub"), min_peer_rate=50 << 20)
    roles = _by_role(run_sources(job, lambda n: None))
    assert (tmp_path / "out.part").read_bytes() == DATA
    assert roles["hub"] > 0 and roles["peer"] > 0


def test_no_source_left_fails_naming_them(tmp_path, servers):
    peer = Server(status=404)
    servers.append(peer)
    with pytest.raises(TransferFailed, match="HTTP 404") as caught:
        run_sources(_job(tmp_path, (peer, "peer")), lambda n: None)
    assert caught.value.detail[0]["dead"] is True


class Answer:
    """A 206 answer: its Content-Range and a body that may end early."""

    def __init__(self, content_range: str | None, body: bytes):
        self.content_range, self.body = content_range, body

    def getheader(self, name: str) -> str | None:
        return self.content_range if name == "Content-Range" else None

    def read(self) -> bytes:
        body, self.body = self.body, b""
        return body

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), len(self.body), 7)  # a few bytes at a time
        view[:n] = self.body[:n]
        self.body = self.body[n:]
        return n


def test_read_range_fills_the_buffer_with_exactly_the_range():
    buf = bytearray(64)
    answer = Answer("bytes 10-29/100", DATA[10:30])
    view = read_range(answer, buf, 10, 30, 100, wrong_range_fatal=True)
    assert bytes(view) == DATA[10:30]


@pytest.mark.parametrize("fatal", [True, False])
def test_read_range_refuses_another_range_as_the_caller_says(fatal):
    with pytest.raises(SourceFailed) as failed:
        read_range(Answer("bytes 0-19/100", DATA[:20]), bytearray(20), 10, 30, 100,
                   wrong_range_fatal=fatal)  # fmt: skip
    assert failed.value.fatal is fatal
    assert str(failed.value) == "Content-Range 'bytes 0-19/100' != 'bytes 10-29/100'"


def test_read_range_fails_a_short_body_without_giving_the_source_up():
    with pytest.raises(SourceFailed) as failed:
        read_range(Answer("bytes 10-29/100", DATA[10:25]), bytearray(20), 10, 30, 100,
                   wrong_range_fatal=True)  # fmt: skip
    assert not failed.value.fatal
    assert str(failed.value) == "connection closed after 15 of 20 bytes"
