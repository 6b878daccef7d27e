"""Transfer worker processes: the pool the node borrows them from, and the child itself.

Parent side: :class:`TransferPool` keeps long-lived :class:`TransferWorker` children shared
by the downloads of one process (:func:`shared_pool`). Child side (``python -m
llmlb.node.models.download.workers``, :func:`main`) runs ``hf_transfer`` downloads.

``hf_transfer.download`` holds the GIL for a whole transfer, so it never runs inside the
serving process. Protocol: one JSON job per line on stdin
(``{"url", "path", "connections", "chunk_size", "headers", "no_proxy"}``); for each job,
stdout gets one ``{"n": BYTES}`` line per finished chunk, then ``{"ok": true}`` or
``{"error": MESSAGE}``.

A job with ``"kind": "sources"`` fetches one file's ranges from peers and the hub instead
(:mod:`.sources`); its ``ok`` (or ``error``) line also carries ``sources``, the bytes each
source delivered and which were dropped.

Allowlist guard: ``hf_transfer`` follows redirects and has no switch to stop it, so every
host it may reach is policed through its HTTP client's proxy settings: ``HTTP(S)_PROXY``
point at a loopback port this process holds bound but never listens on (connections to it
are refused at once), and ``NO_PROXY`` lists the job's allowlisted hosts (``no_proxy``), which
are reached directly. A redirect to any other host fails the transfer with
``error sending request for url (URL)``, before one byte of it arrives. When the node's
environment configures a proxy already, that proxy is kept and polices egress instead.
The node keeps its workers between jobs (:class:`TransferPool`); when the parent dies,
stdin closes (idle worker) or the next progress write fails (busy worker) and the worker
exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import orjson

from llmlb import lifecycle
from llmlb.errors import DownloadCancelled
from llmlb.node.models.download.signals import Transient

# --- parent side -------------------------------------------------------------------------


class TransferWorker:
    """A ``python -m llmlb.node.models.download.workers`` child, started on first use and reused.

    It runs one job at a time. A child that died (or was killed to cancel a transfer) is
    started again by the next job. Whenever a job ends other than with the child's own
    ``ok``/``error`` line, the child is killed, so that no stale progress line of an aborted
    job can reach the next one.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.starts = 0  # processes started over this worker's life

    @property
    def pid(self) -> int | None:
        """Process id of the running child, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> subprocess.Popen:
        """Start the child unless it is running (returns at once; it imports meanwhile)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            if self._proc is not None:
                _reap(self._proc)
            self._proc = lifecycle.popen(  # its parent-death signal follows this process
                [sys.executable, "-m", "llmlb.node.models.download.workers"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
            self.starts += 1
            return self._proc

    def run(self, job: dict, on_bytes: Callable[[int], None]) -> dict:
        """Run one job; returns the child's final ``ok`` message (a ``sources`` job's carries
        the per-source summary) and raises ``Transient`` when it fails (with the summary as
        its ``detail``)."""
        proc = self.start()
        assert proc.stdin is not None and proc.stdout is not None
        in_sync = False
        try:
            proc.stdin.write(orjson.dumps(job) + b"\n")
            proc.stdin.flush()
            for line in proc.stdout:
                msg = orjson.loads(line)
                if "n" in msg:
                    on_bytes(int(msg["n"]))
                    continue
                in_sync = True
                if msg.get("ok"):
                    return msg
                raise Transient(str(msg.get("error")), detail=msg.get("sources"))
            raise Transient("transfer worker exited")
        except (OSError, ValueError) as exc:  # broken pipe, pipe closed by close()
            raise Transient(f"transfer worker: {exc}") from None
        finally:
            if not in_sync:
                self.close()

    def close(self) -> None:
        """Stop the child (kills it if a transfer is still running); ``run`` restarts it."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()


class TransferPool:
    """Long-lived transfer worker processes shared by the downloads of one process.

    Workers start on first use (or :meth:`prestart`), are handed to one file at a time and
    kept between models, so a download does not pay an interpreter start. A worker exits by
    itself when this process dies (its stdin closes, or its next progress write fails).

    Args:
        size: most worker processes at once (files downloading in parallel, all models).
    """

    def __init__(self, size: int = 4):
        self.size = max(1, size)
        self._idle: list[TransferWorker] = []
        self._busy: set[TransferWorker] = set()
        self._cond = threading.Condition()
        self._closed = False

    def prestart(self, n: int) -> None:
        """Make sure up to ``n`` idle workers have a running (or starting) process."""
        with self._cond:
            while len(self._idle) + len(self._busy) < min(n, self.size):
                self._idle.append(TransferWorker())
            workers = self._idle[-n:] if n > 0 else []
        for worker in workers:
            worker.start()

    @contextlib.contextmanager
    def worker(self, stop: threading.Event | None = None) -> Iterator[TransferWorker]:
        """Borrow a worker for one job (waits while all are busy; gives up once ``stop``)."""
        with self._cond:
            while True:
                if self._closed:
                    raise DownloadCancelled("transfer workers are shut down")
                if stop is not None and stop.is_set():
                    raise DownloadCancelled("download cancelled")
                if self._idle:
                    worker = self._idle.pop()
                    break
                if len(self._busy) < self.size:
                    worker = TransferWorker()
                    break
                self._cond.wait(0.1)
            self._busy.add(worker)
        try:
            yield worker
        finally:
            with self._cond:
                self._busy.discard(worker)
                if self._closed:
                    worker.close()
                else:
                    self._idle.append(worker)
                self._cond.notify()

    def pids(self) -> list[int]:
        """Process ids of the running workers (for tests and diagnostics)."""
        with self._cond:
            workers = [*self._idle, *self._busy]
        return [pid for w in workers if (pid := w.pid) is not None]

    def close(self) -> None:
        """Kill every worker; the pool refuses new jobs afterwards."""
        with self._cond:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle.clear()
            self._cond.notify_all()
        for worker in workers:
            worker.close()


_shared: tuple[int, TransferPool] | None = None
_shared_lock = threading.Lock()


def shared_pool() -> TransferPool:
    """This process's :class:`TransferPool` (created on first use, closed at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():  # a forked child makes its own
            from llmlb.node.models.download.options import DownloadOptions

            pool = TransferPool(DownloadOptions().parallel_files)
            atexit.register(pool.close)
            _shared = (os.getpid(), pool)
        return _shared[1]


# --- the child ---------------------------------------------------------------------------

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


def _run_job(job: dict, out, guard: _Guard) -> dict:
    """Download one file as ``job`` describes, reporting progress on ``out``; returns the
    fields of the ``ok`` line."""
    write = threading.Lock()

    def progress(n: int) -> None:
        with write:
            out.write(b'{"n":%d}\n' % n)
            out.flush()

    if job.get("kind") == "sources":
        from llmlb.node.models.download.sources import run_sources

        return {"sources": run_sources(job, progress)}

    import hf_transfer

    guard.allow(job.get("no_proxy"))

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
    return {}


def main() -> int:
    """The child: serve jobs from stdin until it closes."""
    lifecycle.die_with_parent()  # even mid-transfer, when the node dies
    out = sys.stdout.buffer
    guard = _Guard()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            result = _run_job(orjson.loads(line), out, guard)
        except BrokenPipeError:
            return 1
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            error = {"error": str(exc) or type(exc).__name__}
            if (detail := getattr(exc, "detail", None)) is not None:
                error["sources"] = detail
            try:
                out.write(orjson.dumps(error) + b"\n")
            except BrokenPipeError:
                return 1
        else:
            out.write(orjson.dumps({"ok": True, **result}) + b"\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
