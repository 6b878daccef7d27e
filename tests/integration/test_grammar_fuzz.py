"""Property-based fuzzing of JSON schemas and patterns in ``tools`` and ``response_format``
against one real Gemma node: never a 5xx, never a crash, ``/health`` answered within 1 s
throughout. Bounded: a fixed number of examples, three tokens each."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.node_fixtures import model_status, place_model, start_node
from tests.procs import spawner, wait_until
from tests.router_fixtures import call

MODEL = "local/gemma-fuzz"
HEALTH_BOUND_S = 1.0

# counts from ordinary to absurd: where llama.cpp's parser, the converter and memory give out
counts = st.one_of(
    st.integers(0, 64), st.integers(0, 5000), st.sampled_from([20_000, 100_000, 10**9, 10**15])
)
atoms = st.sampled_from(["a", "[a-z]", "\\d", ".", "(ab|cd)", "[^x]", "\\w"])


@st.composite
def quantified(draw: st.DrawFn, inner: st.SearchStrategy[str]) -> str:
    atom = draw(inner)
    kind = draw(st.sampled_from(["", "*", "+", "?", "{n}", "{m,n}", "{m,}"]))
    low, high = sorted((draw(counts), draw(counts)))
    return atom + kind.replace("m", str(low)).replace("n", str(high))


patterns = st.recursive(
    quantified(atoms),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map("".join),
        quantified(inner.map(lambda p: f"({p})")),
        st.lists(inner, min_size=2, max_size=4).map(lambda ps: "(" + "|".join(ps) + ")"),
    ),
    max_leaves=6,
).map(lambda p: f"^{p}$")

leaves = st.one_of(
    st.builds(
        lambda n, m: {"type": "string", "maxLength": n, "minLength": min(m, n)}, counts, counts
    ),
    st.builds(lambda p: {"type": "string", "pattern": p}, patterns),
    st.builds(
        lambda n: {"type": "string", "enum": [f"v{i}" for i in range(n)]},
        st.sampled_from([1, 3, 200, 300, 5000, 40000]),
    ),
    st.builds(
        lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi},
        st.integers(-(10**20), 10**20),
        st.integers(-(10**20), 10**20),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "number"}),
)
schemas = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda s, n: {"type": "array", "items": s, "maxItems": n}, inner, counts),
        st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": list(props)}
        ),
        st.lists(inner, min_size=2, max_size=4).map(lambda alts: {"anyOf": alts}),
    ),
    max_leaves=8,
)


class HealthWatch:
    """Polls ``/health`` all along and records the slowest answer (or a failure)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):  # pacing of the probes
            started = time.monotonic()
            try:
                status = call(self.node, "GET", "/health", timeout=10).status
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            self.slowest = max(self.slowest, time.monotonic() - started)
            if status != 200:
                self.failures.append(str(status))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_gguf) -> Iterator[dict]:
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    try:
        store = tmp_path_factory.mktemp("store")
        place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
        url = start_node(spawn, "", None, store)
        wait_until(
            lambda: (model_status(url, MODEL) or {}).get("state") == "ready",
            timeout=120,
            message="the model ready",
        )
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        assert call(url, "POST", "/v1/chat/completions", None, body, timeout=120).status == 200
        watch = HealthWatch(url)
        yield {"url": url, "watch": watch}
        watch.stop()
    finally:
        stop_all()


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(schema=schemas, as_tool=st.booleans(), stream=st.booleans())
def test_no_schema_gets_a_5xx_or_hurts_the_node(node, schema, as_tool, stream):
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 3,
        "stream": stream,
    }
    if as_tool:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        body["tool_choice"] = "required"
    else:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema},
        }
    raw = json.dumps(body).encode()  # integers beyond 64 bits too, which orjson won't write
    headers = {"Content-Type": "application/json"}
    reply = call(
        node["url"], "POST", "/v1/chat/completions", None, raw=raw, headers=headers, timeout=120
    )
    assert reply.status < 500, (reply.status, reply.body[:500])
    if reply.status == 400:
        assert reply.json["error"]["type"] == "invalid_request_error", reply.body[:500]
    else:
        assert reply.status == 200, reply.body[:500]
        if stream:
            assert b'"code":"inference_failed"' not in reply.body, reply.body[-500:]
    assert node["url"].proc.alive()


def test_the_node_answered_health_within_a_second_throughout(node):
    watch = node["watch"]
    assert not watch.failures, watch.failures
    assert watch.slowest < HEALTH_BOUND_S, watch.slowest
