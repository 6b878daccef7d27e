"""``llmlb up`` end to end: a fresh home, a real chat answer, a clean stop, a reusing restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from openai import OpenAI

from tests.factories import write_gguf
from tests.hub_fixtures import make_repo, start_hub
from tests.proc_tree import descendants, gone
from tests.procs import LLMLB, Proc, free_port, wait_until

BANNER_END = "Press Ctrl-C to stop."


def start_up(spawn, env: dict[str, str], port: int, node_port: int, *args: str) -> Proc:
    """Run ``llmlb up ARGS`` and wait for its banner."""
    argv = [*LLMLB, "up", "--port", str(port), "--node-port", str(node_port), *args]
    proc = spawn(argv, env=env, name="up")

    def banner() -> bool:
        if not proc.alive():
            raise AssertionError(f"llmlb up exited early:\n{proc.log()}")
        return BANNER_END in proc.log()

    wait_until(banner, timeout=240, interval=0.2, message="llmlb up's banner")
    return proc


def stop_and_check(proc: Proc, sig: int) -> None:
    """Send ``sig`` to ``llmlb up`` alone; it must exit (0 unless SIGKILL) and leave nothing.

    After SIGKILL the children stop by themselves: they get SIGTERM when ``llmlb up`` dies.
    """
    children = descendants(proc.pid)
    assert len(children) >= 4, children  # the router, the node and their workers
    os.kill(proc.pid, sig)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 0
    assert proc.popen.wait(timeout=60) == expected, proc.log()
    wait_until(
        lambda: all(gone(pid) for pid in children),
        timeout=15,
        message=f"children {sorted(children)} to exit",
    )


def test_up_chat_stop_and_restart(spawn, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        "LLMLB_HOME": str(home),
        "LLMLB_ADMIN_KEY": "",
        "XLLM_MODELS_DIR": "",
        "LLM_MODELS_DIR": "",
    }
    port, node_port = free_port(), free_port()

    first = start_up(spawn, env, port, node_port)
    log = first.log()
    api_key = re.search(r"API key:\s+(sk-\S+)", log).group(1)
    base_url = re.search(r"Base URL:\s+(\S+)", log).group(1)
    assert base_url == f"http://127.0.0.1:{port}/v1"
    assert re.search(r"Models:\s+gemma-3-270m", log)
    assert "curl " in log and "from openai import OpenAI" in log
    for name in ("api.key", "node.key"):
        assert (home / name).stat().st_mode & 0o777 == 0o600
    model_dir = home / "models" / "gemma-3-270m"
    assert (model_dir / "chat_template.jinja").read_text().startswith("{{ bos_token }}")

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    text = reply.choices[0].message.content or ""
    # real generated text, through the template (the demo model is base Gemma, not -it)
    assert re.search(r"[A-Za-z]{3,}", text), text
    assert reply.usage.completion_tokens > 0

    chat = subprocess.run(
        [
            *LLMLB,
            "chat",
            "gemma-3-270m",
            "Say hello.",
            "--max-tokens",
            "8",
            "--router",
            f"http://127.0.0.1:{port}",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    assert any(ch.isalpha() for ch in chat.stdout)

    gguf = next(model_dir.glob("*.gguf"))
    placed_at = gguf.stat().st_mtime_ns
    stop_and_check(first, signal.SIGINT)

    # A second run reuses the home: same key, same model file, nothing placed again.
    second = start_up(spawn, env, port, node_port)
    log = second.log()
    assert re.search(r"API key:\s+(sk-\S+)", log).group(1) == api_key
    assert "placing the demo model" not in log
    assert gguf.stat().st_mtime_ns == placed_at
    stop_and_check(second, signal.SIGTERM)


def test_up_model_registers_and_shows_download_progress(spawn, tmp_path: Path) -> None:
    # A 4 MiB GGUF served at 2 MB/s: the download takes about two seconds.
    gguf = write_gguf(
        tmp_path / "src" / "slow-F32.gguf",
        arch="llama",
        file_type="F32",
        tensors=[("w", [1024, 1024], "F32")],
    )
    root = tmp_path / "hub"
    make_repo(root, "org/slow", {"slow-F32.gguf": gguf})
    hub = start_hub(spawn, root, "--bandwidth", "2M")
    env = {
        "LLMLB_HOME": str(tmp_path / "home"),
        "LLMLB_ADMIN_KEY": "",
        "XLLM_MODELS_DIR": "",
        "LLM_MODELS_DIR": "",
        "HF_ENDPOINT": hub,
        "LLMLB_HEARTBEAT_INTERVAL_S": "0.2",
    }

    proc = start_up(spawn, env, free_port(), free_port(), "--model", "Org/Slow")
    log = proc.log()
    progress = re.findall(r"llmlb up: org/slow: downloading .* \((\d+)%\)", log)
    assert progress, log
    assert int(progress[0]) < 100
    assert re.search(r"Models:\s+org/slow", log)
    assert (tmp_path / "home" / "models" / "org" / "slow" / "slow-F32.gguf").is_file()
    assert not (tmp_path / "home" / "models" / "gemma-3-270m").exists()
    stop_and_check(proc, signal.SIGKILL)
