"""The llama-server floor: llama.cpp's own server from process start to the first token.

``llama-server`` (the binary ``bench/engine/build_server.py`` builds and caches, same
llama.cpp revision and flags as the node's llama-cpp-python) is started with the node's
slots and per-slot context (``-np S -c S*C``, the node's ``--concurrency`` and
``--ctx-size`` defaults) and threads; the same streamed ``/v1/completions`` request as the
node's (one token) is sent as soon as the server accepts connections and repeated while it
answers 503 (loading). The clock runs from just before the process is spawned until the first
token event arrives, so it holds process start, model load, context creation and the token.
Timed with llama-server's defaults (a warm-up decode at start) and with ``--no-warmup`` (the
node warms nothing up before its first request).
"""

from __future__ import annotations

import math
import socket
import subprocess
import time
from pathlib import Path

from bench.coldstart.common import first_token, free_port

#: The node's defaults (``llmlb.node.settings``): slots per model and context per slot.
NODE_SLOTS = 4
NODE_CTX = 4096


def server_binary() -> Path:
    """The cached (or freshly built) ``llama-server``."""
    from bench.engine.build_server import binary_path, installed_version

    path = binary_path(installed_version())
    if not path.exists():
        built = subprocess.run(
            ["python", str(Path(__file__).resolve().parents[1] / "engine" / "build_server.py")],
            check=True, capture_output=True, text=True,
        )
        path = Path(built.stdout.strip().splitlines()[-1])
    return path


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def server_first_token(
    binary: Path,
    gguf: Path,
    log: Path,
    *,
    slots: int = NODE_SLOTS,
    ctx: int = NODE_CTX,
    threads: int | None = None,
    warmup: bool = True,
    timeout: float = 120.0,
) -> dict[str, float]:
    """Spawn llama-server over ``gguf``; seconds from spawn to the first streamed token
    (``warmup``: llama-server's default empty decode at start; the node does none)."""
    from llmlb.node.inference.engine import usable_cores

    threads = threads or usable_cores()
    port = free_port()
    argv = [str(binary), "-m", str(gguf), "-np", str(slots), "-c", str(slots * ctx),
            "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1", "--port", str(port),
            "--no-webui", *(() if warmup else ("--no-warmup",))]
    with open(log, "ab") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = started + timeout
        listening_s = float("nan")
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
            if not _accepting(port):
                time.sleep(0.002)
                continue
            if math.isnan(listening_s):
                listening_s = time.monotonic() - started
            sent = time.monotonic()
            seconds, status = first_token(f"http://127.0.0.1:{port}", "model")
            if status == 200:
                return {"total_s": sent - started + seconds, "listening_s": listening_s}
            time.sleep(0.005)  # 503 while loading
        raise RuntimeError(f"llama-server gave no token within {timeout}s; see {log}")
    finally:
        proc.kill()
        proc.wait()
