"""A real node tells its routers which prefix keys its caches hold: the keys of each
conversation it served and of the answer it gave, so the conversation's next turn (with no
header at all) matches them; a restarted node starts a new epoch with an empty snapshot."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE
from llmlb.prefix_keys import CacheReport, answer_key, request_keys

from tests.node_fixtures import model_status, place_model, start_node
from tests.procs import wait_until
from tests.router_fixtures import call

MODEL = "local/gemma-reports"
CHAT = "/v1/chat/completions"


class RecordingRouter:
    """Answers cache reports with 202 and records them; anything else is 503 (the node keeps
    serving its local models while it cannot register)."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, CacheReport]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.endswith("/cache"):
                    owner.reports.append((self.path, CacheReport.parse(orjson.loads(body))))
                    self.send_response(202)
                else:
                    self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def held(self, epoch: str) -> set[int]:
        """What the router's index would hold for ``epoch`` after the reports so far."""
        keys: set[int] = set()
        for _, report in self.reports:
            if report.epoch != epoch:
                continue
            if report.snapshot:
                keys = set(report.stored.get(MODEL, ()))
            else:
                keys |= set(report.stored.get(MODEL, ()))
                keys -= set(report.removed.get(MODEL, ()))
        return keys

    def epochs(self) -> list[str]:
        return list(dict.fromkeys(report.epoch for _, report in self.reports))


@pytest.fixture
def router() -> Iterator[RecordingRouter]:
    recording = RecordingRouter()
    yield recording
    recording.server.shutdown()


def _turns(*texts: str) -> dict:
    messages = [{"role": "system", "content": "You answer briefly. " * 20}]
    for i, text in enumerate(texts):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}


def test_a_node_reports_its_conversations_and_answers_and_a_restart_starts_afresh(
    spawn, tmp_path, gemma_gguf, router
):
    store = tmp_path / "store"
    place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
    node = start_node(spawn, router.url, "sk-node-key-reports", store)
    wait_until(lambda: (model_status(node, MODEL) or {}).get("state") == "ready", timeout=120)
    wait_until(lambda: router.epochs(), timeout=30, message="a first (snapshot) report")
    first_epoch = router.epochs()[0]

    first = _turns("Name a colour.")
    reply = call(node, "POST", CHAT, None, first, timeout=120)
    assert reply.status == 200, reply.body
    said = reply.json["choices"][0]["message"]["content"]
    keys = request_keys(CHAT, first)
    answer = answer_key(CHAT, keys, said)
    assert answer is not None
    wanted = {k for k, _ in keys} | {answer[0]}
    wait_until(lambda: wanted <= router.held(first_epoch), timeout=10,
               message="the conversation's and the answer's keys reported")

    # the next turn, as any client sends it, continues exactly what the node announced
    second = _turns("Name a colour.", said, "Another one?")
    assert request_keys(CHAT, second)[len(keys)][0] == answer[0]
    assert all(path == f"/v0/nodes/{path.split('/')[3]}/cache" for path, _ in router.reports)

    node.proc.stop()
    again = start_node(spawn, router.url, "sk-node-key-reports", store, port=node.port)
    wait_until(lambda: len(router.epochs()) == 2, timeout=30, message="a new epoch")
    fresh = [r for _, r in router.reports if r.epoch == router.epochs()[1]]
    assert fresh[0].snapshot and not fresh[0].stored.get(MODEL)  # nothing held after a restart
    assert call(again, "GET", "/health").status == 200
