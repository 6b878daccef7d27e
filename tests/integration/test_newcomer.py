"""A newcomer's first five minutes, as the README tells them: every example answers.

``llmlb up`` in a fresh home; the README's curl and ``llmlb chat`` lines run as written (only
the router's port differs, and the README's ``.venv/bin/llmlb`` is this environment's); the
banner's Python snippet, curl and CLI lines run as printed (the conversation one with a turn
on its stdin); each answers text, the curl examples with an answer of the instruction-tuned
demo model that ends by itself (``finish_reason: "stop"``), while one long answer of the base
model streams all along (a second client is never refused). Then Ctrl-C with a generation
in flight: everything is gone and both ports are free.

The bounds here only catch a hang (``HANG_S``): how fast each step is (the README's "within
seconds" and "about 3 seconds") is measured by ``bench/newcomer/run.py``, which runs the same
steps through the helpers below.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from llmlb.cli.up import DEMO_MAX_TOKENS

from tests.integration.test_up import start_up
from tests.proc_tree import descendants, gone, port_free
from tests.procs import Proc, free_port, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL = "smollm2-135m-instruct"
# The base model: it never ends a turn, so its answer keeps a stream in flight.
BASE_MODEL = "gemma-3-270m"
# What an answer must hold: visible text.
ANSWER_TEXT = r"\S"
HANG_S = 180.0  # any one step: beyond this it is stuck, not slow (a 32-token answer took
# 67 s with the machine's 2 cores at load 8)


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


def run_example(
    argv: list[str], env: dict[str, str], what: str, stdin: str = ""
) -> tuple[str, float]:
    """Run ``argv`` with ``stdin``; it must succeed (within ``HANG_S``). Its stdout, and how
    long it took."""
    began = time.monotonic()
    try:
        result = subprocess.run(
            argv, env=env, input=stdin, capture_output=True, text=True, timeout=HANG_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}: no answer after {HANG_S:.0f}s") from None
    took = time.monotonic() - began
    assert result.returncode == 0, f"{what}: {result.stdout}\n{result.stderr}"
    return result.stdout, took


def chat_text(stdout: str, what: str, max_tokens: int, ends: bool = False) -> str:
    """The answer text of a chat completion printed as JSON (by curl); with ``ends``, an
    answer that ended by itself before ``max_tokens``."""
    reply = orjson.loads(stdout)
    assert "error" not in reply, f"{what}: {reply}"
    text = reply["choices"][0]["message"]["content"]
    assert re.search(ANSWER_TEXT, text or ""), f"{what}: {reply}"
    assert 0 < reply["usage"]["completion_tokens"] <= max_tokens, f"{what}: {reply['usage']}"
    if ends:
        assert reply["choices"][0]["finish_reason"] == "stop", f"{what}: {reply}"
        assert reply["usage"]["completion_tokens"] < max_tokens, f"{what}: {reply['usage']}"
    return text


def some_text(stdout: str, what: str) -> None:
    """Printed output with visible text in it."""
    assert re.search(ANSWER_TEXT, stdout), f"{what}: {stdout!r}"


class LongAnswer:
    """A streaming chat completion kept open in a thread (a first client being served)."""

    def __init__(self, port: int, key: str):
        self.first_chunk = threading.Event()
        self.status: int | None = None
        body = {
            "model": BASE_MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000,
            "stream": True,
        }
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_S)
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


@dataclass
class Example:
    """One copy-and-paste step: what it is, how to run it, and what its output must show."""

    what: str
    argv: list[str]
    env: dict[str, str]
    check: Callable[[str], object]
    stdin: str = ""


@dataclass
class Newcomer:
    """``llmlb up`` started in a fresh home, as the README's first command leaves it."""

    up: Proc
    home: Path
    port: int
    node_port: int
    api_key: str
    log: str


def start_newcomer(spawn: Callable[..., Proc], root: Path) -> Newcomer:
    """``llmlb up`` in ``root/home`` on free ports; its banner shows the key and its file."""
    home = root / "home"
    port, node_port = free_port(), free_port()
    env_up = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": "", "XLLM_MODELS_DIR": ""}
    env_up["LLM_MODELS_DIR"] = ""
    up = start_up(spawn, env_up, port, node_port)
    log = up.log()
    key = re.search(r"API key:\s+(sk-\S+) \(kept in (\S+)\)", log)
    assert key and Path(key.group(2)) == home / "api.key", log
    assert (home / "api.key").read_text().strip() == key.group(1)
    assert f"{MODEL} is SmolLM2-135M-Instruct" in log and BASE_MODEL in log
    return Newcomer(up, home, port, node_port, key.group(1), log)


def examples(newcomer: Newcomer, root: Path) -> list[Example]:
    """The README's and the banner's examples, ready to run against ``newcomer``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMLB_")}
    env.update(LLMLB_HOME=str(newcomer.home),
               LLMLB_ROUTER_URL=f"http://127.0.0.1:{newcomer.port}")
    llmlb = Path(sys.executable).with_name("llmlb")
    log = newcomer.log

    curl = readme_block("curl ").replace("127.0.0.1:8080", f"127.0.0.1:{newcomer.port}")
    max_tokens = int(re.search(r'"max_tokens": (\d+)', curl).group(1))
    # The README's key path also works without LLMLB_HOME (the default home, ~/.llmlb).
    fake_home = root / "user"
    fake_home.mkdir(exist_ok=True)
    if not (fake_home / ".llmlb").exists():
        (fake_home / ".llmlb").symlink_to(newcomer.home)
    env_default = {k: v for k, v in env.items() if k != "LLMLB_HOME"}
    env_default["HOME"] = str(fake_home)
    chat = readme_block(".venv/bin/llmlb chat ").replace(".venv/bin/llmlb", str(llmlb))
    banner_curl = banner_section(log, "Try it with curl:")
    # A request naming no max_tokens ends at the demo node's cap.
    no_cap = re.sub(r', "max_tokens": \d+', "", banner_curl)
    assert no_cap != banner_curl

    def answer(what: str, limit: int, ends: bool = False) -> Callable[[str], object]:
        return lambda out: chat_text(out, what, limit, ends)

    def text(what: str) -> Callable[[str], object]:
        return lambda out: some_text(out, what)

    snippet = banner_section(log, "or with Python (pip install openai):")
    one_shot, conversation = banner_section(
        log, "or with the CLI (one question, or a conversation without one):"
    ).splitlines()
    return [
        Example("README curl", ["bash", "-c", curl], env,
                answer("README curl", max_tokens, ends=True)),
        Example("README curl, default home", ["bash", "-c", curl], env_default,
                answer("README curl, default home", max_tokens, ends=True)),
        Example("README llmlb chat", ["bash", "-c", chat], env, text("README llmlb chat")),
        Example("banner Python", [sys.executable, "-c", snippet], env, text("banner Python")),
        Example("banner curl", ["bash", "-c", banner_curl], env,
                answer("banner curl", max_tokens, ends=True)),
        Example("banner CLI", ["bash", "-c", one_shot], env, text("banner CLI")),
        Example("banner CLI conversation", ["bash", "-c", conversation], env,
                text("banner CLI conversation"), stdin="Hello!\nWhat can you do?\n"),
        Example("no max_tokens", ["bash", "-c", no_cap], env,
                answer("no max_tokens", DEMO_MAX_TOKENS)),
    ]


def ctrl_c(newcomer: Newcomer, long_answer: LongAnswer) -> tuple[LongAnswer, float]:
    """Ctrl-C ``llmlb up`` with a generation in flight; wait (``HANG_S`` at most) until every
    process it started is gone and both ports are free. The answer used, and the seconds."""
    if not long_answer.streaming():
        long_answer.close()
        long_answer = LongAnswer(newcomer.port, newcomer.api_key)
        assert long_answer.first_chunk.wait(HANG_S)
    up = newcomer.up
    tree = descendants(up.pid)
    assert len(tree) >= 4, tree  # router, node and their workers
    began = time.monotonic()
    os.kill(up.pid, signal.SIGINT)

    def all_gone() -> bool:
        return (
            up.popen.poll() is not None
            and all(gone(pid) for pid in tree)
            and port_free(newcomer.port)
            and port_free(newcomer.node_port)
        )

    wait_until(all_gone, timeout=HANG_S, interval=0.02, message="llmlb up to stop")
    took = time.monotonic() - began
    long_answer.close()
    assert up.popen.returncode == 0, up.log()
    return long_answer, took


@pytest.mark.timeout(900)  # nine steps, each bounded by HANG_S
def test_readme_and_banner_examples_answer_and_ctrl_c_is_clean(spawn, tmp_path: Path) -> None:
    newcomer = start_newcomer(spawn, tmp_path)
    # A first client is served all along: nobody after it is refused or kept waiting.
    long_answer = LongAnswer(newcomer.port, newcomer.api_key)
    assert long_answer.first_chunk.wait(HANG_S) and long_answer.status == 200
    for example in examples(newcomer, tmp_path):
        out, _took = run_example(example.argv, example.env, example.what, example.stdin)
        example.check(out)
    ctrl_c(newcomer, long_answer)
