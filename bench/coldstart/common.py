"""Shared pieces of the cold-start benchmark: process trees, timing, statistics, page cache.

Every process a scenario starts goes through :class:`ProcTree`, which stops the whole tree
(each child in its own process group) when the scenario ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import mmap
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import GEMMA_NAME, assemble_gemma  # noqa: E402
from tests.procs import Proc, free_port, http_status, wait_until  # noqa: E402

PY = sys.executable
LLMLB = [PY, "-m", "llmlb.cli.main"]
NODE_LAUNCH = [PY, str(Path(__file__).with_name("node_launch.py"))]
ADMIN_KEY = "sk-bench-coldstart-admin-0123456789"
MB = 1_000_000
MIB = 1 << 20

__all__ = [
    "ADMIN_KEY",
    "GEMMA_NAME",
    "LLMLB",
    "MB",
    "MIB",
    "NODE_LAUNCH",
    "PY",
    "REPO_ROOT",
    "ProcTree",
    "Stats",
    "evict",
    "first_token",
    "free_port",
    "group_cpu_seconds",
    "gemma_path",
    "http_json",
    "http_status",
    "resident_fraction",
    "stats",
    "wait_until",
    "warm",
    "workdir",
]


# --- processes ---------------------------------------------------------------------------


class ProcTree:
    """Processes started for one scenario; all stopped (group-wide) on exit.

    Args:
        logs: directory for one log file per process.
    """

    def __init__(self, logs: Path):
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def spawn(self, argv: list[str], env: dict[str, str] | None = None, name: str = "proc") -> Proc:
        """Start ``argv`` (cwd = repo root, repo root on ``PYTHONPATH``)."""
        full_env = {"PYTHONPATH": str(REPO_ROOT), **(env or {})}
        proc = Proc(argv, self.logs / f"{name}-{len(self.procs)}.log", env=full_env, cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """Stop one process (and its group) now."""
        proc.stop(timeout=10)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def close(self) -> None:
        """Stop every process still running, newest first."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)
        self.procs.clear()

    def __enter__(self) -> ProcTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def workdir(base: Path | None, keep: bool) -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix="llmlb-coldstart-", dir=base))
    try:
        yield path
    finally:
        if keep:
            print(f"kept work directory {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into ``KeyboardInterrupt`` so ``finally`` blocks clean up."""

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


# --- statistics --------------------------------------------------------------------------


@dataclass
class Stats:
    """Median and spread of one measure over several runs (seconds unless ``unit`` says)."""

    values: list[float]
    unit: str = "s"
    median: float = field(init=False)
    min: float = field(init=False)
    max: float = field(init=False)

    def __post_init__(self) -> None:
        self.median = statistics.median(self.values) if self.values else float("nan")
        self.min = min(self.values) if self.values else float("nan")
        self.max = max(self.values) if self.values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "unit": self.unit,
            "n": len(self.values),
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "values": self.values,
        }


def stats(values: Sequence[float], unit: str = "s") -> Stats:
    """Summarise ``values``."""
    return Stats([float(v) for v in values], unit)


# --- the model ---------------------------------------------------------------------------


gemma_path = assemble_gemma


def link_or_copy(src: Path, dest: Path) -> Path:
    """Hard-link ``src`` to ``dest`` (copy across file systems)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    return dest


# --- page cache --------------------------------------------------------------------------


def evict(paths: Sequence[Path]) -> None:
    """Drop ``paths`` from the page cache (``fdatasync`` then ``POSIX_FADV_DONTNEED``)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Sequence[Path]) -> None:
    """Read ``paths`` once so they sit in the page cache."""
    buf = bytearray(8 * MIB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: Path) -> float:
    """Share of ``path``'s pages in the page cache (``mincore``); ``nan`` if unknown."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return float("nan")
            return sum(b & 1 for b in bytes(vec)) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid:  # fields[0] is field 3 (state): pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


# --- HTTP --------------------------------------------------------------------------------


def http_json(
    url: str, method: str = "GET", body: Any = None, key: str | None = None, timeout: float = 30.0
) -> tuple[int, Any]:
    """One request; returns ``(status, decoded JSON or None)`` (never raises on 4xx/5xx)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path, orjson.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return resp.status, None


def first_token(
    base_url: str, model: str, prompt: str = "Hello", timeout: float = 120.0
) -> tuple[float, int]:
    """Stream ``/v1/completions`` (one token); seconds until the first token event arrives.

    Returns:
        ``(seconds, status)``; ``seconds`` is ``nan`` when no token arrived.
    """
    parts = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    conn.connect()
    body = orjson.dumps(
        {"model": model, "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0}
    )
    started = time.monotonic()
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return float("nan"), resp.status
        for line in resp:
            if line.startswith(b"data: {"):
                event = orjson.loads(line[6:])
                if event.get("choices"):
                    elapsed = time.monotonic() - started
                    resp.read()
                    return elapsed, 200
        return float("nan"), resp.status
    finally:
        conn.close()


def poll(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.005,
    message: str = "condition",
) -> Any:
    """Like ``wait_until`` with a finer default interval (timings depend on it)."""
    return wait_until(predicate, timeout=timeout, interval=interval, message=message)
