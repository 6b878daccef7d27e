"""A newcomer's first five minutes, as the README tells them: every example answers in seconds.

``llmlb up`` in a fresh home; the README's curl and ``llmlb chat`` lines run as written (only
the router's port differs, and the README's ``.venv/bin/llmlb`` is this environment's); the
banner's Python snippet, curl and CLI lines run as printed; each answers text within 10 s,
with one long answer streaming all along (a second client is never refused). Then Ctrl-C with
a generation in flight: everything is gone and both ports are free within 3 s.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
from llmlb.cli.up import DEMO_MAX_TOKENS

from tests.integration.test_up import start_up
from tests.proc_tree import descendants, gone, port_free
from tests.procs import free_port, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL = "gemma-3-270m"
# What an answer must hold: visible text. The examples sample (temperature 1) from the base
# model, which sometimes answers with digits and punctuation only ("#6\n#1\n…").
ANSWER_TEXT = r"\S"
ANSWER_S = 10.0  # every example, copied as printed
STOP_S = 3.0  # Ctrl-C to nothing left


def readme_block(first_word: str) -> str:
    """The README's ```bash block whose command starts with ``first_word``."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.lstrip().startswith(first_word)]
    assert len(found) == 1, f"README: one ```bash block starting with {first_word!r}: {found}"
    return found[0].strip()


def banner_section(log: str, heading: str) -> str:
    """The indented lines under ``heading`` in ``llmlb up``'s banner, de-indented."""
    lines = log.split(heading + "\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert lines and all(line.startswith("  ") for line in lines), lines
    return "\n".join(line[2:] for line in lines)


def timed(argv: list[str], env: dict[str, str], what: str) -> str:
    """Run ``argv``; it must succeed within ``ANSWER_S``; returns its stdout."""
    began = time.monotonic()
    try:
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=3 * ANSWER_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: no answer after {3 * ANSWER_S:.0f}s") from None
    took = time.monotonic() - began
    assert result.returncode == 0, f"{what}: {result.stdout}\n{result.stderr}"
    assert took < ANSWER_S, f"{what} took {took:.1f}s"
    return result.stdout


def chat_text(stdout: str, what: str, max_tokens: int) -> str:
    """The answer text of a chat completion printed as JSON (by curl)."""
    reply = orjson.loads(stdout)
    assert "error" not in reply, f"{what}: {reply}"
    text = reply["choices"][0]["message"]["content"]
    assert re.search(ANSWER_TEXT, text or ""), f"{what}: {reply}"
    assert 0 < reply["usage"]["completion_tokens"] <= max_tokens, f"{what}: {reply['usage']}"
    return text


class LongAnswer:
    """A streaming chat completion kept open in a thread (a first client being served)."""

    def __init__(self, port: int, key: str):
        self.first_chunk = threading.Event()
        self.status: int | None = None
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000,
            "stream": True,
        }
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self._conn.request(
            "POST",
            "/v1/chat/completions",
            body=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            response = self._conn.getresponse()
            self.status = response.status
            while line := response.readline():
                if line.startswith(b"data: {") and b'"content"' in line:
                    self.first_chunk.set()
        except OSError:
            pass  # the server went away (Ctrl-C): expected at the end
        finally:
            self.first_chunk.set()

    def streaming(self) -> bool:
        """Whether the answer is still arriving."""
        return self._thread.is_alive()

    def close(self) -> None:
        self._conn.close()


def test_readme_and_banner_examples_answer_in_seconds_and_ctrl_c_is_clean(
    spawn, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    port, node_port = free_port(), free_port()
    env_up = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": "", "XLLM_MODELS_DIR": ""}
    env_up["LLM_MODELS_DIR"] = ""
    up = start_up(spawn, env_up, port, node_port)
    log = up.log()
    key = re.search(r"API key:\s+(sk-\S+) \(kept in (\S+)\)", log)
    assert key and Path(key.group(2)) == home / "api.key", log
    assert (home / "api.key").read_text().strip() == key.group(1)
    assert "base (not instruction-tuned) Gemma 3 270M" in log
    api_key = key.group(1)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMLB_")}
    env.update(LLMLB_HOME=str(home), LLMLB_ROUTER_URL=f"http://127.0.0.1:{port}")
    local = f"127.0.0.1:{port}"
    llmlb = Path(sys.executable).with_name("llmlb")

    # A first client is served all along: nobody after it is refused or kept waiting.
    long_answer = LongAnswer(port, api_key)
    assert long_answer.first_chunk.wait(ANSWER_S) and long_answer.status == 200

    curl = readme_block("curl ").replace("127.0.0.1:8080", local)
    max_tokens = int(re.search(r'"max_tokens": (\d+)', curl).group(1))
    chat_text(timed(["bash", "-c", curl], env, "README curl"), "README curl", max_tokens)

    # The README's key path also works without LLMLB_HOME (the default home, ~/.llmlb).
    fake_home = tmp_path / "user"
    fake_home.mkdir()
    (fake_home / ".llmlb").symlink_to(home)
    env_default = {k: v for k, v in env.items() if k != "LLMLB_HOME"}
    env_default["HOME"] = str(fake_home)
    out = timed(["bash", "-c", curl], env_default, "README curl, default home")
    chat_text(out, "README curl, default home", max_tokens)

    chat = readme_block(".venv/bin/llmlb chat ").replace(".venv/bin/llmlb", str(llmlb))
    assert re.search(ANSWER_TEXT, timed(["bash", "-c", chat], env, "README llmlb chat"))

    snippet = banner_section(log, "or with Python (pip install openai):")
    out = timed([sys.executable, "-c", snippet], env, "banner Python")
    assert re.search(ANSWER_TEXT, out), out

    banner_curl = banner_section(log, "Try it with curl:")
    out = timed(["bash", "-c", banner_curl], env, "banner curl")
    chat_text(out, "banner curl", max_tokens)

    out = timed(["bash", "-c", banner_section(log, "or with the CLI:")], env, "banner CLI")
    assert re.search(ANSWER_TEXT, out), out

    # A request naming no max_tokens ends at the demo node's cap.
    no_cap = re.sub(r', "max_tokens": \d+', "", banner_curl)
    assert no_cap != banner_curl
    chat_text(timed(["bash", "-c", no_cap], env, "no max_tokens"), "no max_tokens", DEMO_MAX_TOKENS)

    # Ctrl-C with a generation in flight.
    if not long_answer.streaming():
        long_answer.close()
        long_answer = LongAnswer(port, api_key)
        assert long_answer.first_chunk.wait(ANSWER_S)
    tree = descendants(up.pid)
    assert len(tree) >= 4, tree  # router, node and their workers
    began = time.monotonic()
    os.kill(up.pid, signal.SIGINT)

    def all_gone() -> bool:
        return (
            up.popen.poll() is not None
            and all(gone(pid) for pid in tree)
            and port_free(port)
            and port_free(node_port)
        )

    wait_until(all_gone, timeout=STOP_S + 2, interval=0.02, message="llmlb up to stop")
    took = time.monotonic() - began
    long_answer.close()
    assert up.popen.returncode == 0, up.log()
    assert took < STOP_S, f"Ctrl-C took {took:.1f}s"
