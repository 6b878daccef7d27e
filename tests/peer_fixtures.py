"""A fake peer for fleet tests: registers with the router as a node that holds a model ready,
heartbeats, publishes piece maps with the true piece hashes (``/v0/peer/pieces/…``) and serves
``/v0/peer/files/…`` with every byte flipped (a lying peer); or holds a URL where nothing
listens (a peer nobody can reach), or one that accepts connections and never answers."""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import orjson
from llmlb.node.models.pieces import PIECE_SIZE, encode_bits, piece_count

from tests.router_fixtures import call, free_url

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_FLIP = bytes(b ^ 0xFF for b in range(256))  # every byte of a lie


class FakePeer:
    """A node stand-in claiming ``models`` (id -> revision) ready, serving corrupt bytes.

    Args:
        router: the router's base URL.
        node_key: a node-scope key.
        files: ``(model_id, filename)`` -> the true file on disk (served flipped).
        models: model id -> revision it claims to hold.
        listen: serve the peer route (else register a URL where nothing listens).
        hang: accept connections and never answer (with ``listen=False``).
        state: the state it reports for its models.
    """

    def __init__(
        self,
        router: str,
        node_key: str,
        files: dict[tuple[str, str], Path],
        models: dict[str, str],
        *,
        listen: bool = True,
        hang: bool = False,
        state: str = "ready",
    ):
        self.router, self.node_key, self.files, self.models = router, node_key, files, models
        self.requests: list[tuple[str, str, str | None]] = []  # (path, authorization, range)
        self.node_id = "fake-" + secrets.token_hex(4)
        self.secret = secrets.token_urlsafe(24)
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self.state = state
        self._lock = threading.Lock()
        self._cache: dict[Path, bytes] = {}
        self._piece_hashes: dict[Path, dict[str, str]] = {}
        self._hung: socket.socket | None = None
        self.url = free_url()
        if hang:  # a listening socket nobody accepts from: connects succeed, nothing answers
            self._hung = socket.socket()
            self._hung.bind(("127.0.0.1", 0))
            self._hung.listen(64)
            self.url = f"http://127.0.0.1:{self._hung.getsockname()[1]}"
        if listen:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
            self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                peer.requests.append(
                    (self.path, self.headers.get("authorization"), self.headers.get("range"))
                )
                if "/v0/peer/pieces/" in self.path:
                    self._map()
                    return
                rest = self.path.split("/v0/peer/files/", 1)[-1]
                quoted_id, _, quoted_name = rest.partition("/")
                true = peer.files.get((unquote(quoted_id), unquote(quoted_name)))
                if true is None:
                    self.send_error(404)
                    return
                data = peer._bytes(true)
                match = _RANGE.fullmatch(self.headers.get("range") or "")
                start, end = (int(match[1]), int(match[2]) + 1) if match else (0, len(data))
                body = data[start:end].translate(_FLIP)
                self.send_response(206 if match else 200)
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _map(self) -> None:
                rest = self.path.split("/v0/peer/pieces/", 1)[-1].partition("?")[0]
                quoted_id, _, quoted_name = rest.partition("/")
                model_id = unquote(quoted_id)
                true = peer.files.get((model_id, unquote(quoted_name)))
                if true is None:
                    self.send_error(404)
                    return
                data = peer._bytes(true)
                n = piece_count(len(data), PIECE_SIZE)
                body = orjson.dumps(
                    {
                        "size": len(data),
                        "piece_size": PIECE_SIZE,
                        "revision": peer.models.get(model_id),
                        "epoch": "fake",
                        "seq": n,
                        "have": encode_bits([True] * n),
                        "hashes": peer._hashes(true),
                        "hub": [],
                        "complete": True,
                        "uploads": 0,
                    }
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def _bytes(self, path: Path) -> bytes:
        """The true file, read once."""
        with self._lock:
            if path not in self._cache:
                self._cache[path] = path.read_bytes()
            return self._cache[path]

    def _hashes(self, path: Path) -> dict[str, str]:
        """The true piece hashes of ``path``, computed once."""
        with self._lock:
            if path not in self._piece_hashes:
                data = path.read_bytes()
                self._piece_hashes[path] = {
                    str(i): hashlib.sha256(data[i * PIECE_SIZE : (i + 1) * PIECE_SIZE]).hexdigest()
                    for i in range(piece_count(len(data), PIECE_SIZE))
                }
            return self._piece_hashes[path]

    def _reports(self) -> list[dict]:
        return [{"id": m, "state": self.state, "revision": r} for m, r in self.models.items()]

    def __enter__(self) -> FakePeer:
        if self._server is not None:
            threading.Thread(target=self._server.serve_forever, daemon=True).start()
        body = {
            "node_id": self.node_id,
            "url": self.url,
            "runtimes": ["llama.cpp"],
            "slots": 1,
            "models": self._reports(),
            "node_secret": self.secret,
        }
        reply = call(self.router, "POST", "/v0/nodes", self.node_key, body)
        assert reply.status == 201, reply.body
        self.peer_token = reply.json["peer_token"]
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def _beat(self) -> None:
        body = {"models": self._reports(), "node_secret": self.secret}
        path = f"/v0/nodes/{self.node_id}/heartbeat"
        while not self._stop.wait(0.3):
            call(self.router, "POST", path, self.node_key, body, timeout=5)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._hung is not None:
            self._hung.close()
