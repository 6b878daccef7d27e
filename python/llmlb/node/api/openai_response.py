"""OpenAI response shapes: chat completions, completions, their stream chunks, usage.

One place for the wire shapes the engine produces, so streamed and non-streamed answers
(and chat and completions) cannot drift apart.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

# Identifies the serving stack in every answer, as OpenAI's ``system_fingerprint`` does.
SYSTEM_FINGERPRINT = "llmlb-llama.cpp"


def response_id(prefix: str) -> str:
    """A fresh id such as ``chatcmpl-…``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def tool_call(call: Any) -> dict[str, Any]:
    """``message.tool_calls[i]`` of a whole answer."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_deltas(index: int, call: Any, pieces: int = 3) -> list[dict[str, Any]]:
    """The ``delta.tool_calls`` of one call, as OpenAI streams it: id and name first, then
    the arguments in pieces."""
    head = {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": ""}}
    size = max(1, -(-len(call.arguments) // pieces))
    parts = [call.arguments[i : i + size] for i in range(0, len(call.arguments), size)]
    return [head, *({"index": index, "function": {"arguments": p}} for p in parts)]


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


@dataclass
class TokenLogprob:
    """One token's logprob entry (with its most likely alternatives); ``logprob`` is
    ``None`` for a prompt's first token, which nothing predicts."""

    token: str
    raw: bytes
    logprob: float | None
    top: list[tuple[str, bytes, float]] = field(default_factory=list)


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
