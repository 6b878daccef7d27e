"""The llama.cpp engine in-process with the real Gemma: per-model slots and the LRU."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from llmlb.errors import ApiError
from llmlb.model_storage import ModelStorage
from llmlb.node.engine import Engine, EngineOptions
from llmlb.node.metrics import NodeMetrics

from tests.node_fixtures import place_model

A, B = "local/gemma-a", "local/gemma-b"
GEMMA_EOS = 1  # <eos>: banned where a generation must keep its slot until the test closes it


@pytest.fixture(scope="module")
def store(tmp_path_factory, gemma_gguf) -> Path:
    """A store holding two hand-placed copies (hard links) of the Gemma GGUF."""
    root = tmp_path_factory.mktemp("store")
    for model_id in (A, B):
        place_model(root, model_id, gemma_gguf)
    return root


def _engine(store: Path, **options) -> tuple[Engine, dict[str, str]]:
    storage = ModelStorage(store)
    paths = {m: str(storage.resolve(m).primary_path) for m in (A, B)}
    return Engine(storage, NodeMetrics(), EngineOptions(n_ctx=512, **options)), paths


async def _poll(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


def _short(prompt: str = "Paris is the capital of") -> dict:
    return {"prompt": prompt, "max_tokens": 3, "temperature": 0}


def test_excess_requests_queue_then_get_429_with_retry_after(store):
    async def scenario():
        engine, paths = _engine(store, max_loaded=1, concurrency=1, queue_depth=1)
        try:
            long = {
                "prompt": "Once upon a time",
                "max_tokens": 400,
                "stream": True,
                "logit_bias": {GEMMA_EOS: -100.0},
            }
            stream = await engine.complete(A, paths[A], long)
            first = await anext(stream)  # generating: the only slot is taken
            assert first.startswith(b"data: ")
            assert engine.active_requests() == 1
            queued = asyncio.create_task(engine.complete(A, paths[A], _short()))
            await _poll(lambda: engine.queued(A) == 1)
            with pytest.raises(ApiError) as rejected:
                await engine.complete(A, paths[A], _short())
            assert not queued.done()
            await stream.aclose()  # the client goes away: the slot frees, the queued one runs
            result = await asyncio.wait_for(queued, 60)
            return rejected.value, result
        finally:
            await engine.close()

    rejected, result = asyncio.run(scenario())
    assert rejected.status == 429 and rejected.code == "model_overloaded"
    assert int(rejected.headers()["retry-after"]) >= 1
    assert result["choices"][0]["text"] and result["usage"]["completion_tokens"] > 0


def test_queue_timeout_answers_429(store):
    async def scenario():
        engine, paths = _engine(store, max_loaded=1, concurrency=1, queue_timeout_s=0.2)
        try:
            long = {"prompt": "Hello", "max_tokens": 400, "stream": True}
            long["logit_bias"] = {GEMMA_EOS: -100.0}
            stream = await engine.complete(A, paths[A], long)
            await anext(stream)
            with pytest.raises(ApiError) as timed_out:
                await engine.complete(A, paths[A], _short())
            await stream.aclose()
            return timed_out.value
        finally:
            await engine.close()

    timed_out = asyncio.run(scenario())
    assert timed_out.status == 429 and "retry-after" in timed_out.headers()


def test_least_recently_used_model_is_unloaded_with_max_loaded_one(store):
    async def scenario():
        engine, paths = _engine(store, max_loaded=1)
        seen = []
        try:
            for model_id in (A, B, A):
                result = await engine.complete(model_id, paths[model_id], _short())
                assert result["model"] == model_id and result["choices"][0]["text"]
                seen.append(engine.loaded())
            return seen
        finally:
            await engine.close()

    seen = asyncio.run(scenario())
    assert seen == [[A], [B], [A]]


def test_two_loaded_models_evict_the_least_recently_used(store, gemma_gguf, tmp_path):
    place_model(tmp_path, "local/c", gemma_gguf)
    storage = ModelStorage(tmp_path)
    path_c = str(storage.resolve("local/c").primary_path)

    async def scenario():
        engine, paths = _engine(store, max_loaded=2)
        paths["local/c"] = path_c
        try:
            for model_id in (A, B, A, "local/c"):
                await engine.complete(model_id, paths[model_id], _short())
            return engine.loaded()
        finally:
            await engine.close()

    assert asyncio.run(scenario()) == [A, "local/c"]  # B was the least recently used
