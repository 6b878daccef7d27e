"""The OpenAI dialect's renderer: the engine's typed answers and events as chat completions,
completions, their stream chunks, usage, and embeddings.

One place for the OpenAI wire shapes, so streamed and non-streamed answers (and chat and
completions) cannot drift apart. :func:`chat`, :func:`complete` and :func:`embed` are the
routes' work: parse (:mod:`llmlb.node.api.openai_request`), run, render.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from llmlb.node.api import openai_request
from llmlb.node.inference.contract import (
    Answer,
    ChatEvent,
    Done,
    Embeddings,
    Error,
    TextDelta,
    TokenLogprob,
    ToolCallArgs,
    ToolCallStart,
    Usage,
)
from llmlb.node.inference.embedder import encode

# Identifies the serving stack in every answer, as OpenAI's ``system_fingerprint`` does.
SYSTEM_FINGERPRINT = "llmlb-llama.cpp"


def response_id(prefix: str) -> str:
    """A fresh id such as ``chatcmpl-…``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def tool_call(call: Any) -> dict[str, Any]:
    """``message.tool_calls[i]`` of a whole answer."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """The ``usage`` object (``prompt_tokens_details.cached_tokens`` from prompt reuse)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat answer."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.raw),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(raw)} for t, raw, lp in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """``choices[i].logprobs`` of a legacy completion (text offsets start at ``offset``)."""
    offsets, position = [], offset
    for e in entries:
        offsets.append(position)
        position += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            None if e.logprob is None else {t: lp for t, _raw, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }


class Shaper:
    """Builds the dicts of one answer (``chat`` or ``completion``).

    Args:
        chat: chat completion shapes, else legacy completion shapes.
        model: the model id echoed in every object.
    """

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = response_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def answer(self, choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        body = self._envelope(self.object, choices)
        body["usage"] = use
        return body

    def choice(
        self,
        index: int,
        text: str,
        finish: str,
        logprobs: dict[str, Any] | None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One choice of a whole answer (chat: with ``tool_calls`` when it made calls)."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["content"] = text or None
                message["tool_calls"] = tool_calls
            return {"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(
        self,
        index: int,
        text: str | None = None,
        *,
        finish: str | None = None,
        role: bool = False,
        logprobs: dict[str, Any] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One stream chunk for choice ``index``."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish}
        return self._envelope(self.object, [choice])

    def usage_chunk(self, use: dict[str, Any]) -> dict[str, Any]:
        """The final chunk of ``stream_options.include_usage``: no choices, the usage."""
        body = self._envelope("chat.completion.chunk" if self.chat else self.object, [])
        body["usage"] = use
        return body


# -- the contract's answers and events, rendered -------------------------------------------


def _usage(use: Usage) -> dict[str, Any]:
    return usage(use.prompt_tokens or 0, use.completion_tokens, use.cached_tokens)


def answer(shaper: Shaper, result: Answer) -> dict[str, Any]:
    """A whole answer (chat completion or completion)."""
    out = []
    for choice in result.choices:
        logprobs = None
        if choice.logprobs is not None:
            logprobs = (
                chat_logprobs(choice.logprobs) if shaper.chat
                else completion_logprobs(choice.logprobs, 0)
            )  # fmt: skip
        calls = [tool_call(c) for c in choice.tool_calls] or None
        out.append(shaper.choice(choice.index, choice.text, choice.finish_reason, logprobs, calls))
    return shaper.answer(out, _usage(result.usage))


def chunk(shaper: Shaper, event: ChatEvent, include_usage: bool) -> dict[str, Any] | None:
    """The stream chunk of one event (``None``: the event has none)."""
    if isinstance(event, TextDelta):
        if event.logprobs is not None:
            entries = list(event.logprobs)
            logprobs = chat_logprobs(entries) if shaper.chat else completion_logprobs(entries, 0)
            return shaper.chunk(event.index, event.text, logprobs=logprobs)
        return shaper.chunk(event.index, event.text)
    if isinstance(event, ToolCallStart):
        head = {"index": event.call, "id": event.id, "type": "function",
                "function": {"name": event.name, "arguments": ""}}  # fmt: skip
        return shaper.chunk(event.index, None, tool_calls=[head])
    if isinstance(event, ToolCallArgs):
        delta = {"index": event.call, "function": {"arguments": event.arguments}}
        return shaper.chunk(event.index, None, tool_calls=[delta])
    if isinstance(event, Done):
        return shaper.chunk(event.index, None, finish=event.reason)
    if isinstance(event, Usage):
        return shaper.usage_chunk(_usage(event)) if include_usage else None
    kind = "server_error" if event.status >= 500 else "invalid_request_error"
    return {"error": {"message": event.message, "type": kind, "code": event.code}}


class SSEStream:
    """A streamed run as OpenAI's SSE (``data: [DONE]`` after a run that did not fail);
    closing it, even unstarted, ends the run.

    Args:
        shaper: the answer's shapes.
        events: the engine's stream (with ``choices`` and ``aclose``).
        include_usage: end with the usage chunk.
    """

    def __init__(self, shaper: Shaper, events: Any, include_usage: bool):
        self._shaper = shaper
        self._events = events
        self._include_usage = include_usage
        self._pending: list[bytes] = []
        if shaper.chat:
            self._pending = [
                sse(shaper.chunk(index, "", role=True)) for index in range(events.choices)
            ]
        self._ended = False

    def __aiter__(self) -> SSEStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._pending:
                return self._pending.pop(0)
            if self._ended:
                raise StopAsyncIteration
            try:
                event = await self._events.__anext__()
            except StopAsyncIteration:
                self._ended = True
                return SSE_DONE
            data = chunk(self._shaper, event, self._include_usage)
            if isinstance(event, Error):
                self._ended = True
                await self.aclose()
                return sse(data or {})
            if data is not None:
                return sse(data)

    async def aclose(self) -> None:
        """Stop generating and release the slots."""
        self._ended = True
        self._pending.clear()
        await self._events.aclose()


def _render(shaper: Shaper, result: Any, include_usage: bool) -> dict[str, Any] | SSEStream:
    if isinstance(result, Answer):
        return answer(shaper, result)
    return SSEStream(shaper, result, include_usage)


def embeddings(model_id: str, result: Embeddings, base64: bool) -> dict[str, Any]:
    """The ``/v1/embeddings`` answer."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, base64)}
            for i, v in enumerate(result.vectors)
        ],
        "model": model_id,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


# -- the routes' work -----------------------------------------------------------------------


async def chat(engine: Any, model_id: str, path: str, body: dict[str, Any]) -> Any:
    """``/v1/chat/completions``: the answer dict, or SSE bytes when ``stream``.

    Raises:
        ApiError: 400 naming the field for a bad body, or what the engine raises.
    """
    request = openai_request.chat_request(body)
    result = await engine.chat(model_id, path, request)
    return _render(Shaper(True, model_id), result, request.generation.include_usage)


async def complete(engine: Any, model_id: str, path: str, body: dict[str, Any]) -> Any:
    """``/v1/completions``: the answer dict, or SSE bytes when ``stream``."""
    request = openai_request.completion_request(body)
    result = await engine.complete(model_id, path, request)
    return _render(Shaper(False, model_id), result, request.generation.include_usage)


async def embed(engine: Any, model_id: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """``/v1/embeddings``: pooled, unit-norm vectors."""
    request = openai_request.embedding_request(body)
    result = await engine.embed(model_id, path, request)
    return embeddings(model_id, result, request.base64)


__all__ = [
    "SSE_DONE",
    "SYSTEM_FINGERPRINT",
    "SSEStream",
    "Shaper",
    "TokenLogprob",
    "answer",
    "chat",
    "chat_logprobs",
    "chunk",
    "complete",
    "completion_logprobs",
    "embed",
    "embeddings",
    "response_id",
    "sse",
    "tool_call",
    "usage",
]
