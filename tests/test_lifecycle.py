"""``llmlb.lifecycle``: children die with their parent process, not with a parent thread."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

from llmlb import lifecycle

from tests.procs import wait_until

# A child that asks to die with its parent, says so, then answers each line it reads.
CHILD = [
    sys.executable,
    "-c",
    "import sys\n"
    "from llmlb import lifecycle\n"
    "lifecycle.die_with_parent()\n"
    "print('ready', flush=True)\n"
    "for line in sys.stdin:\n"
    "    print('pong', flush=True)\n",
]


def start_from_short_thread(spawn) -> subprocess.Popen:
    """Start ``CHILD`` with ``spawn`` from a thread that then ends (its OS thread too)."""
    started: list[subprocess.Popen] = []

    def run() -> None:
        child = spawn(CHILD, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        started.append(child)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    task = Path(f"/proc/self/task/{thread.native_id}")
    wait_until(lambda: not task.exists(), timeout=5, message="the thread's exit")
    return started[0]


def ping(child: subprocess.Popen) -> str:
    try:
        child.stdin.write("ping\n")
        child.stdin.flush()
    except BrokenPipeError:
        return ""
    return child.stdout.readline().strip()


def test_child_started_with_popen_outlives_the_thread_that_started_it() -> None:
    child = start_from_short_thread(lifecycle.popen)
    try:
        assert ping(child) == "pong"
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_plain_popen_from_a_thread_ties_the_child_to_that_thread() -> None:
    # The kernel behaviour lifecycle.popen exists for: the parent-death signal follows the
    # thread that forked the child.
    child = start_from_short_thread(subprocess.Popen)
    assert child.wait(timeout=5) == -signal.SIGKILL


def test_parent_gone_before_the_request_ends_the_child_at_once() -> None:
    script = "from llmlb import lifecycle; lifecycle.die_with_parent(parent_pid=1); print('on')"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == -signal.SIGKILL
    assert "on" not in result.stdout
