"""Launching and waiting on the real processes tests run (router, nodes, hub stand-in)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

LLMLB = [sys.executable, "-m", "llmlb.cli.main"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago, never one handed out before.

    The kernel may give the same ephemeral port to two binds in a row once the first socket
    is closed, so a test asking for two ports could get one twice; remembering the ports
    already handed out in this process keeps them distinct.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _deadline(timeout: float, message: str) -> Callable[[], None]:
    """A check that raises ``TimeoutError`` once ``timeout`` seconds from now have passed."""
    end = time.monotonic() + timeout

    def check() -> None:
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")

    return check


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` at the deadline.

    The one polling helper of the tests (:func:`wait_until_async` inside an event loop).
    """
    check = _deadline(timeout, message)
    while not (result := predicate()):
        check()
        time.sleep(interval)
    return result


async def wait_until_async(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float = 0.01,
    message: str = "condition",
) -> object:
    """:func:`wait_until` for a coroutine: the event loop runs while it waits."""
    check = _deadline(timeout, message)
    while not (result := predicate()):
        check()
        await asyncio.sleep(interval)
    return result


def http_status(
    url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> int | None:
    """Status of ``GET url``; ``None`` when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


class Proc:
    """A child process in its own process group, logging to a file, killed at teardown."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        else:  # reap any children left in the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode

    def wait_http(self, url: str, timeout: float = 60.0, ok: tuple[int, ...] = (200,)) -> None:
        """Wait until ``GET url`` answers one of ``ok``; fail early if the process died."""

        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(
                    f"{self.argv} exited with {self.popen.returncode}:\n{self.log()}"
                )
            return http_status(url) in ok

        try:
            wait_until(ready, timeout=timeout, message=url)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- log of {self.argv}:\n{self.log()}") from None


def spawner(directory: Path) -> tuple[Callable[..., Proc], Callable[[], None]]:
    """``(spawn, stop_all)``: start processes logging into ``directory``; stop them all.

    ``spawn(argv, env=None, name="proc", cwd=None)`` returns a :class:`Proc`.
    """
    procs: list[Proc] = []

    def spawn(
        argv: list[str],
        env: dict[str, str] | None = None,
        name: str = "proc",
        cwd: Path | None = None,
    ) -> Proc:
        proc = Proc(argv, directory / f"{name}-{len(procs)}.log", env=env, cwd=cwd)
        procs.append(proc)
        return proc

    def stop_all() -> None:
        for proc in reversed(procs):
            proc.stop()

    return spawn, stop_all
