"""Worker process that runs ``hf_transfer`` downloads for the node's downloader.

``hf_transfer.download`` holds the GIL for a whole transfer, so it never runs inside the
serving process. Protocol: one JSON job per line on stdin
(``{"url", "path", "connections", "chunk_size", "headers", "no_proxy"}``); for each job,
stdout gets one ``{"n": BYTES}`` line per finished chunk, then ``{"ok": true}`` or
``{"error": MESSAGE}``.

Allowlist guard: ``hf_transfer`` follows redirects and has no switch to stop it, so every
host it may reach is policed through its HTTP client's proxy settings: ``HTTP(S)_PROXY``
point at a loopback port this process holds bound but never listens on (connections to it
are refused at once), and ``NO_PROXY`` lists the job's allowlisted hosts (``no_proxy``), which
are reached directly. A redirect to any other host fails the transfer with
``error sending request for url (URL)``, before one byte of it arrives. When the node's
environment configures a proxy already, that proxy is kept and polices egress instead.
The node keeps its workers between jobs (``downloader.TransferPool``); when the parent dies,
stdin closes (idle worker) or the next progress write fails (busy worker) and the worker
exits.
"""

from __future__ import annotations

import os
import socket
import sys

import orjson

from llmlb import lifecycle

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

# Chunk-level retries inside hf_transfer (dropped connections, 5xx): attempts per chunk and
# how many chunks may be failing at once.
CHUNK_RETRIES = 5
PARALLEL_FAILURES = 4


class _Guard:
    """The refusing proxy of the allowlist guard (``None`` port: a proxy is configured)."""

    def __init__(self) -> None:
        self.port: int | None = None
        if any(os.environ.get(name) for name in _PROXY_VARS):
            return
        # Bound, never listening: the port stays ours and every connect to it is refused.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        for name in _PROXY_VARS:
            os.environ[name] = f"http://127.0.0.1:{self.port}"

    def allow(self, no_proxy: str | None) -> None:
        """Let only the hosts of ``no_proxy`` (comma-separated) be reached, for one job."""
        if self.port is not None:
            os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy or ""


def _run_job(job: dict, out, guard: _Guard) -> None:
    """Download one file as ``job`` describes, reporting progress on ``out``."""
    import hf_transfer

    guard.allow(job.get("no_proxy"))

    def progress(n: int) -> None:
        out.write(b'{"n":%d}\n' % n)
        out.flush()

    connections = max(1, int(job["connections"]))
    hf_transfer.download(
        url=job["url"],
        filename=job["path"],
        max_files=connections,
        chunk_size=int(job["chunk_size"]),
        parallel_failures=min(PARALLEL_FAILURES, connections),
        max_retries=CHUNK_RETRIES,
        headers=job.get("headers") or None,
        callback=progress,
    )


def main() -> int:
    """Serve jobs from stdin until it closes."""
    lifecycle.die_with_parent()  # even mid-transfer, when the node dies
    out = sys.stdout.buffer
    guard = _Guard()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            _run_job(orjson.loads(line), out, guard)
        except BrokenPipeError:
            return 1
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            try:
                out.write(orjson.dumps({"error": str(exc) or type(exc).__name__}) + b"\n")
            except BrokenPipeError:
                return 1
        else:
            out.write(b'{"ok":true}\n')
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
