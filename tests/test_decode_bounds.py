"""Decode-loop bounds in-process with the real Gemma: a grammar over its per-token budget and a
stalled step end only the offending request; the other requests finish normally."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from llmlb.errors import ApiError
from llmlb.model_storage import ModelStorage
from llmlb.node.api import openai_response as openai_api
from llmlb.node.inference import sampling
from llmlb.node.inference.engine import Engine, EngineOptions
from llmlb.node.inference.jobs import SchedulerLimits
from llmlb.node.metrics import NodeMetrics

from tests.test_node_engine import _gemma_store

MODEL = "local/chat"


def _engine(storage: ModelStorage, limits: SchedulerLimits) -> Engine:
    return Engine(storage, NodeMetrics(), EngineOptions(n_ctx=512, concurrency=4, limits=limits))


def _chat(schema: dict | None, max_tokens: int = 8) -> dict:
    body: dict = {
        "messages": [{"role": "user", "content": "Give me a JSON object."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if schema is not None:
        spec = {"name": "x", "schema": schema}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    return body


def test_a_grammar_over_its_per_token_budget_ends_only_its_request(tmp_path, gemma_gguf):
    storage, path = _gemma_store(tmp_path, gemma_gguf)
    # any real grammar step takes longer than a microsecond: the constrained request must end
    engine = _engine(storage, SchedulerLimits(grammar_token_budget_s=1e-6))

    async def go():
        try:
            plain = asyncio.create_task(openai_api.chat(engine, MODEL, path, _chat(None, 16)))
            with pytest.raises(ApiError) as caught:
                await openai_api.chat(engine, MODEL, path, _chat({"type": "object"}))
            answer = await plain
            return caught.value, answer
        finally:
            await engine.close()

    error, answer = asyncio.run(go())
    assert error.status == 400 and error.code == "grammar_too_complex"
    assert "simplify the schema" in error.message
    assert answer["choices"][0]["finish_reason"] in {"stop", "length"}
    assert answer["usage"]["completion_tokens"] > 0


def test_the_watchdog_ends_a_stalled_request_while_llama_cpp_is_still_inside_it(
    tmp_path, gemma_gguf, monkeypatch, caplog
):
    storage, path = _gemma_store(tmp_path, gemma_gguf)
    stall_s = 6.0
    original = sampling.Sampler.sample

    def slow(self, ctx, index):  # a grammar step that runs away (as a C call would)
        if self.grammar is not None:
            time.sleep(stall_s)
        return original(self, ctx, index)

    monkeypatch.setattr(sampling.Sampler, "sample", slow)
    limits = SchedulerLimits(grammar_token_budget_s=1.0, stall_floor_s=0.5, stall_factor=1)
    engine = _engine(storage, limits)

    async def go():
        try:
            started = time.monotonic()
            with pytest.raises(ApiError) as caught:
                await openai_api.chat(engine, MODEL, path, _chat({"type": "object"}))
            heard = time.monotonic() - started
            after = await openai_api.chat(engine, MODEL, path, _chat(None, 4))
            return caught.value, heard, after
        finally:
            await engine.close()

    with caplog.at_level(logging.WARNING, logger="llmlb.node.inference.scheduler"):
        error, heard, after = asyncio.run(go())
    assert error.status == 400 and error.code == "grammar_too_complex"
    # the client heard before the stalled call returned (it sleeps stall_s), not after
    assert heard < stall_s, heard
    assert any("stalled" in r.message for r in caplog.records)
    assert engine.metrics.registry.get_sample_value("llmlb_node_stalled_steps_total") >= 1
    assert after["usage"]["completion_tokens"] > 0  # the slot was freed and reused
