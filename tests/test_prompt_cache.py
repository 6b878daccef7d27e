"""The RAM prompt cache in-process with the real Gemma: a conversation pushed out of its slot
by another is restored from RAM, and gives what a fresh prefill gives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from llmlb.node.api import openai_response as openai_api
from llmlb.node.inference.engine import Engine, EngineOptions
from llmlb.node.inference.prompt_cache import CachedPrompt, PromptCache
from llmlb.node.metrics import NodeMetrics

from tests.test_node_engine import _gemma_store

MODEL = "local/chat"
SYSTEM_A = "You are a ship's navigator. " * 30
SYSTEM_B = "You are a pastry chef who answers with recipes. " * 30


def _chat(system: str, *turns: str) -> dict:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {
        "messages": messages,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }


def _metric(engine: Engine, name: str, labels: dict) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_conversation_evicted_from_its_slot_is_restored_from_ram(tmp_path, gemma_gguf):
    storage, path = _gemma_store(tmp_path, gemma_gguf)

    def engine(cache_bytes: int, slots: int) -> Engine:
        options = EngineOptions(n_ctx=1024, concurrency=slots, cache_ram_bytes=cache_bytes)
        return Engine(storage, NodeMetrics(), options)

    async def conversation(e: Engine) -> tuple[dict, dict]:
        try:
            first = await openai_api.chat(e, MODEL, path, _chat(SYSTEM_A, "Where are we?"))
            said = first["choices"][0]["message"]["content"]
            await openai_api.chat(e, MODEL, path, _chat(SYSTEM_B, "A cake, please."))
            again = _chat(SYSTEM_A, "Where are we?", said, "And now?")
            second = await openai_api.chat(e, MODEL, path, again)
            return first, second
        finally:
            await e.close()

    cached = engine(256 << 20, slots=1)  # B takes A's only slot: A is saved, then restored
    first, restored = asyncio.run(conversation(cached))
    _, in_slot = asyncio.run(conversation(engine(0, slots=2)))  # A keeps its own slot
    _, fresh = asyncio.run(conversation(engine(0, slots=1)))  # A is evaluated again

    prompt = first["usage"]["prompt_tokens"]
    assert restored["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt
    assert in_slot["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] < 16  # template's start
    assert _metric(cached, "llmlb_node_prompt_cache_events_total", {"event": "restore"}) == 1
    assert _metric(cached, "llmlb_node_cached_prompt_tokens_total", {"source": "ram"}) >= prompt

    def tokens(answer: dict) -> list[str]:
        return [t["token"] for t in answer["choices"][0]["logprobs"]["content"]]

    def logprobs(answer: dict) -> np.ndarray:
        return np.array([t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]])

    # Restoring the saved cells is exact: the same tail evaluated on them as on the cells the
    # slot kept gives the same numbers.
    assert tokens(restored) == tokens(in_slot)
    assert np.allclose(logprobs(restored), logprobs(in_slot), atol=1e-5)
    # Against a fresh prefill, ggml's kernels differ with the batch size (the tail alone vs
    # the whole prompt): the greedy tokens agree, the logprobs within 0.15 (measured ≤ 0.1).
    assert tokens(restored) == tokens(fresh)
    assert np.allclose(logprobs(restored), logprobs(fresh), atol=0.15)


def _entry(tokens: list[int], size: int, pos_min: int = 0) -> CachedPrompt:
    return CachedPrompt(tokens, np.zeros(size, dtype=np.uint8), pos_min)


def test_the_cache_keeps_the_longest_usable_prefix_within_its_bytes():
    cache = PromptCache(limit_bytes=3000, min_tokens=4)
    assert not cache.worth_keeping([1, 2, 3])  # too short
    cache.put(_entry([1, 2, 3, 4, 5], 1000))
    cache.put(_entry([1, 2, 3, 4, 5, 6, 7], 1000))  # extends the first: replaces it
    assert len(cache) == 1
    assert not cache.worth_keeping([1, 2, 3, 4, 5])  # held by the longer entry
    cache.put(_entry([9, 9, 9, 9], 1000))
    cache.put(_entry([8, 8, 8, 8], 1000))  # over 3000 bytes: the least recently used goes
    assert len(cache) == 2 and cache.evictions == 1
    entry, n = cache.best([9, 9, 9, 9, 1], n_swa=0)
    assert entry is not None and n == 4
    entry, n = cache.best([1, 2, 3], n_swa=0)
    assert entry is None and n == 0  # [1, 2, 3, …, 7] was the one evicted


def test_a_sliding_window_entry_is_skipped_when_the_prefix_needs_dropped_cells():
    cache = PromptCache(limit_bytes=10**6, min_tokens=1)
    cache.put(_entry(list(range(100)), 10, pos_min=60))  # the window kept positions 60…99
    assert cache.best(list(range(95)) + [7], n_swa=32) == (cache.best(list(range(100)), 32)[0], 95)
    entry, _ = cache.best(list(range(50)), n_swa=32)
    assert entry is None  # positions 18…49 are needed and gone


@pytest.mark.parametrize("limit", [0, 10])
def test_an_entry_larger_than_the_cache_or_a_cache_that_is_off_keeps_nothing(limit):
    cache = PromptCache(limit_bytes=limit, min_tokens=1)
    cache.put(_entry([1, 2, 3], 100))
    assert len(cache) == 0 and cache.bytes == 0
