"""``llmlb up`` end to end: a fresh home, a real chat answer, a clean stop, a reusing restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import orjson
from openai import OpenAI

from tests.factories import write_gguf
from tests.hub_fixtures import make_repo, start_hub
from tests.proc_tree import descendants, gone, port_free
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
    models = re.search(r"Models:\s+(.*)", log).group(1)
    assert models == "gemma-3-270m, smollm2-135m-instruct", models  # the router sorts them
    assert "curl " in log and "from openai import OpenAI" in log
    for name in ("api.key", "node.key"):
        assert (home / name).stat().st_mode & 0o777 == 0o600
    model_dir = home / "models" / "gemma-3-270m"
    assert (model_dir / "chat_template.jinja").read_text().startswith("{{ bos_token }}")
    smol = home / "models" / "smollm2-135m-instruct"
    assert orjson.loads((smol / "generation_defaults.json").read_bytes())["repeat_penalty"] > 1

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
    assert "placing" not in log and "fetching" not in log
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


def test_up_nodes_starts_a_local_fleet_and_ctrl_c_stops_it(spawn, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": "", "XLLM_MODELS_DIR": ""}
    env["LLM_MODELS_DIR"] = ""
    port, node_port = free_port(), free_port()
    while not (port_free(node_port + 1) and node_port + 1 != port):
        node_port = free_port()
    proc = start_up(spawn, env, port, node_port, "--nodes", "2")
    log = proc.log()
    urls = [f"http://127.0.0.1:{node_port}", f"http://127.0.0.1:{node_port + 1}"]
    assert f"llmlb is up: router http://127.0.0.1:{port}, 2 nodes" in log
    assert f"Nodes:     2 × 4 slots (requests served at once each): {', '.join(urls)}" in log

    # Each node has its own store, the demo models linked into it from the usual one.
    for i in (1, 2):
        store = home / "nodes" / str(i) / "models"
        for model in ("smollm2-135m-instruct", "gemma-3-270m"):
            placed = next((home / "models" / model).glob("*.gguf"))
            linked = store / model / placed.name
            assert linked.stat().st_size == placed.stat().st_size
    assert (home / "logs" / "node-1.log").is_file() and (home / "logs" / "node-2.log").is_file()

    # `llmlb nodes ls` shows both, online, each with both models ready.
    cli_env = {**os.environ, **env, "LLMLB_ROUTER_URL": f"http://127.0.0.1:{port}"}
    cli_env["LLMLB_ADMIN_KEY"] = (home / "admin.key").read_text().strip()
    listed = subprocess.run(
        [*LLMLB, "nodes", "ls", "--json"], env=cli_env, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert listed.returncode == 0, listed.stderr
    nodes = orjson.loads(listed.stdout)
    assert sorted(n["url"] for n in nodes) == urls
    for node in nodes:
        assert node["status"] == "online" and node["slots"] == 4
        ready = sorted(m["id"] for m in node["models"] if m["state"] == "ready")
        assert ready == ["gemma-3-270m", "smollm2-135m-instruct"], node
    table = subprocess.run(
        [*LLMLB, "nodes", "ls"], env=cli_env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert all(url in table.stdout for url in urls), table.stdout

    key = re.search(r"API key:\s+(sk-\S+)", log).group(1)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                    timeout=120)
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Write a haiku about load balancers."}],
        max_tokens=128,
        seed=1,
    )
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content

    # Ctrl-C stops the router and both nodes (and their workers) within 3 s.
    tree = descendants(proc.pid)
    assert len(tree) >= 6, tree  # the router, two nodes and their workers
    os.kill(proc.pid, signal.SIGINT)
    wait_until(
        lambda: proc.popen.poll() is not None
        and all(gone(pid) for pid in tree)
        and all(port_free(p) for p in (port, node_port, node_port + 1)),
        timeout=3.0,
        interval=0.02,
        message="llmlb up --nodes 2 to stop everything",
    )
    assert proc.popen.returncode == 0, proc.log()
