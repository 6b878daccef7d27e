"""``llmlb chat`` against a scripted SSE server: the answer is printed while it is still being
generated, a conversation resends its history, ``--verbose`` shows TTFT and cached tokens,
and errors are one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.procs import LLMLB


class Script:
    """What the fake router answers, and what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.release = threading.Event()  # the rest of the answer waits for this
        self.statuses: list[int] = []  # per request, in order (then 200)

    def chunks(self, turn: int) -> Iterator[dict]:
        usage = {
            "prompt_tokens": 20 * turn,
            "completion_tokens": 3,
            "total_tokens": 20 * turn + 3,
            "prompt_tokens_details": {"cached_tokens": 20 * (turn - 1)},
        }
        yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}
        self.release.wait(30)
        yield {"choices": [{"index": 0, "delta": {"content": f"lo {turn}"}}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield {"choices": [], "usage": usage}


@pytest.fixture
def router() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.bodies.append(body)
            status = script.statuses.pop(0) if script.statuses else 200
            if status != 200:
                data = json.dumps(
                    {"error": {"message": "no such model", "type": "x", "code": "model_not_found"}}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for chunk in script.chunks(len(script.bodies)):
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        script.release.set()
        server.shutdown()
        server.server_close()


def chat(url: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMLB_")}
    return subprocess.Popen(
        [*LLMLB, "chat", "m", *args, "--router", url, "--api-key", "sk-test"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_the_answer_is_printed_as_it_is_generated(router) -> None:
    url, script = router
    proc = chat(url, "Say hello.")
    assert proc.stdout is not None
    # The first piece arrives while the server still holds the rest of the answer back.
    first = proc.stdout.read(3)
    assert first == "Hel" and proc.poll() is None
    script.release.set()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert first + out == "Hello 1\n"
    body = script.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Say hello."}]


def test_a_conversation_resends_its_history_and_verbose_shows_the_cache(router) -> None:
    url, script = router
    script.release.set()
    proc = chat(url, "--verbose", "--system", "Be brief.", "--max-tokens", "9")
    out, err = proc.communicate("Hi\n\nAnd again\n/exit\nnot sent\n", timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["Hello 1", "Hello 2"]
    assert [b["messages"] for b in script.bodies] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello 1"},
            {"role": "user", "content": "And again"},
        ],
    ]
    assert all(b["max_tokens"] == 9 for b in script.bodies)
    lines = re.findall(
        r"\[ttft [\d.]+ s · 3 tokens in [\d.]+ s[^·]* · prompt (\d+) tokens, (\d+) cached · stop\]",
        err,
    )
    assert lines == [("20", "0"), ("40", "20")], err


def test_a_refused_turn_is_one_line_and_left_out_of_the_history(router) -> None:
    url, script = router
    script.statuses = [404]
    once = chat(url, "Hi")
    out, err = once.communicate(timeout=60)
    assert once.returncode == 1 and "no such model" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err

    script.statuses = [404]
    script.release.set()
    script.bodies.clear()
    proc = chat(url)
    out, err = proc.communicate("Hi\nAgain\n", timeout=60)
    assert proc.returncode == 1, err  # a turn failed
    assert "no such model" in err and out.strip().endswith("Hello 2")
    assert script.bodies[1]["messages"] == [{"role": "user", "content": "Again"}]
