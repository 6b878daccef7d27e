"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

A child (a Granian worker, a transfer worker) calls :func:`die_with_parent` as early as it
can. On Linux that asks the kernel for a signal at the parent's death
(``prctl(PR_SET_PDEATHSIG)``) and then checks that the parent is still the expected one, since
it may have died before the call. Elsewhere a daemon thread polls the parent's pid.

The kernel sends that signal when the parent *thread* that forked the child exits, not the
parent process. A parent whose children call :func:`die_with_parent` therefore starts them
with :func:`popen`, which forks from a thread living as long as the process; a child forked
from a short-lived thread (a ``ThreadPoolExecutor``'s) would be killed with that thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1
# How often the watchdog (platforms without PR_SET_PDEATHSIG) looks at the parent's pid.
WATCHDOG_INTERVAL_S = 0.5

_spawner: tuple[int, ThreadPoolExecutor] | None = None
_spawner_lock = threading.Lock()


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits.

    Safe between ``fork`` and ``exec`` (no allocation beyond the ctypes call).

    Returns:
        Whether the request was accepted (``False`` off Linux or if ``prctl`` failed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def expected_parent() -> int:
    """The pid this process should die with: its ``multiprocessing`` parent, else its parent."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid:
        return parent.pid
    return os.getppid()


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """End this process when its parent process ends, however the parent ends.

    Args:
        parent_pid: the parent to follow (default :func:`expected_parent`).
        sig: the signal this process gets (default SIGKILL: nothing can delay it, not even
            native code holding the GIL).
    """
    expected = parent_pid if parent_pid is not None else expected_parent()
    if set_parent_death_signal(sig):
        if os.getppid() != expected:  # the parent died before the kernel was asked
            _end(sig)
        return
    threading.Thread(
        target=_watch_parent, args=(expected, sig), name="llmlb-parent-watchdog", daemon=True
    ).start()


def preexec_die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when we die.

    Call it in the parent (it records the parent's pid); the function it returns runs in
    the child between ``fork`` and ``exec``. Start the child from a long-lived thread (see the
    module docstring).
    """
    parent = os.getpid()

    def preexec() -> None:  # pragma: no cover - runs in the child before exec
        if set_parent_death_signal(sig) and os.getppid() != parent:
            os._exit(1)

    return preexec


def popen(args: Any, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(args, **kwargs)``, forked from a thread that lives as long as we do.

    The main thread forks directly; any other thread hands the fork to one long-lived
    spawner thread, so a child's parent-death signal fires when this process dies and not
    when the calling thread ends.
    """
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(args, **kwargs)
    return _spawner_pool().submit(subprocess.Popen, args, **kwargs).result()  # type: ignore[arg-type]


def _spawner_pool() -> ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # a forked child makes its own
            _spawner = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="llmlb-spawner"))
        return _spawner[1]


def _watch_parent(expected: int, sig: int) -> None:  # pragma: no cover - non-Linux only
    while os.getppid() == expected:
        time.sleep(WATCHDOG_INTERVAL_S)
    _end(sig)


def _end(sig: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(os.getpid(), sig)
    os._exit(1)  # a signal this platform cannot send, or one that is handled
