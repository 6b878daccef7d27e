"""Process trees from ``/proc``: what a process started, and whether it is gone (Linux)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """``state ppid …`` of ``pid`` (the fields after ``(comm)``), ``None`` when absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # ``pid (comm) state ppid …``; comm may hold spaces, so split after the last ")".
    return stat.rsplit(")", 1)[1].split()


def descendants(root: int) -> set[int]:
    """Every live descendant of ``root`` (children, grandchildren, …)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie awaiting its reaper)."""
    fields = _stat(pid)
    return fields is None or fields[0] == "Z"


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ('' when gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def open_files(pid: int) -> list[str]:
    """Paths of the files ``pid`` has open ([] when gone or not ours to read)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    paths = []
    for fd in fds:
        try:
            paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return paths


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``port`` now (as the servers do, with SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants (a node and its workers), in MiB."""
    total = 0
    for each in {pid, *descendants(pid)}:
        try:
            with open(f"/proc/{each}/status") as status:
                total += next(int(x.split()[1]) for x in status if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024
