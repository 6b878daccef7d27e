"""Child processes that ``llmlb up`` supervises: own process group, log file, clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from llmlb import lifecycle

# Seconds the children get to stop on SIGTERM before SIGKILL: Ctrl-C of `llmlb up` ends
# everything within about this (plus the SIGKILL), even with generations in flight.
STOP_GRACE_S = 1.5


class Child:
    """One supervised process, leader of its own process group, output appended to a log.

    Args:
        name: short label used in messages (``router``, ``node``).
        argv: the command line.
        log_path: file receiving stdout and stderr.
        env: the complete environment of the child.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                # SIGTERM when `llmlb up` dies, even by SIGKILL; no threads run at this point.
                preexec_fn=lifecycle.preexec_die_with_parent(signal.SIGTERM),  # noqa: PLW1509
            )

    @property
    def pid(self) -> int:
        """Process id (also the process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the child's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the whole group, SIGKILL it after ``timeout``; returns the exit code."""
        stop_all([self], timeout)
        return self.popen.returncode

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every process of the child's group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


def stop_all(children: list[Child], timeout: float = STOP_GRACE_S) -> None:
    """Stop several children at once: SIGTERM every group, wait, then SIGKILL what is left.

    The final SIGKILL also reaches processes that outlived their group leader (workers).
    """
    for child in children:
        child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        child.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=5)
