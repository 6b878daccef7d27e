"""The engine's chat answers as dialect-neutral events, for the APIs built on chat.

The Responses API and the Anthropic Messages API both run a chat completion and reshape it.
This module reads the engine's chat shapes once: a streamed run's chunk dicts become
:class:`TextDelta`, :class:`ToolCallStart`, :class:`ToolCallDelta`, :class:`Finish`,
:class:`Usage` and :class:`Failure` events, and a whole answer becomes a :class:`ChatAnswer`.

Stop strings can be matched here instead of in the engine (:func:`chat_events` with
``stop``), so that the caller learns *which* one ended the text; chat's ``finish_reason``
only says ``stop`` for a stop string and for the model's own end of turn alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from llmlb.errors import ApiError
from llmlb.node.inference.text_stream import TextStream


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """Tool call number ``index`` begins: its id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call ``index``'s JSON arguments."""

    index: int
    arguments: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The answer ended: chat's ``finish_reason`` (``stop``, ``length``, ``tool_calls``), or
    ``stop_sequence`` with the matched string when :func:`chat_events` matched it."""

    reason: str
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of the run (the last event of a run that did not fail); the prompt's is
    ``None`` when the run was cut at a stop string before the engine counted it."""

    prompt_tokens: int | None
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    """The run failed mid-answer (OpenAI's error object: message, type, code)."""

    error: dict[str, Any]


ChatEvent = TextDelta | ToolCallStart | ToolCallDelta | Finish | Usage | Failure


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete tool call of a whole answer."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChatAnswer:
    """A whole (non-streamed) chat answer's first choice."""

    text: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    stop_sequence: str | None = None


def _usage(raw: dict[str, Any] | None) -> Usage:
    raw = raw or {}
    details = raw.get("prompt_tokens_details") or {}
    return Usage(
        int(raw.get("prompt_tokens", 0)),
        int(raw.get("completion_tokens", 0)),
        int(details.get("cached_tokens", 0) or 0),
    )


def chat_answer(body: dict[str, Any]) -> ChatAnswer:
    """The first choice of a chat.completion dict."""
    choice = body["choices"][0]
    message = choice.get("message") or {}
    calls = [
        ToolCall(
            str(call.get("id") or ""),
            str((call.get("function") or {}).get("name") or ""),
            str((call.get("function") or {}).get("arguments") or ""),
        )
        for call in message.get("tool_calls") or []
    ]
    return ChatAnswer(
        text=message.get("content") or "",
        tool_calls=calls,
        finish_reason=choice.get("finish_reason") or "stop",
        usage=_usage(body.get("usage")),
    )


async def chat_events(
    chunks: AsyncIterator[dict[str, Any]], stop: tuple[str, ...] = ()
) -> AsyncIterator[ChatEvent]:
    """The events of a streamed chat run (its chunk dicts, with ``include_usage`` on).

    Args:
        chunks: the engine's chunk iterator; closed when this generator is (which cancels
            the generation).
        stop: stop strings to match in the text here (the engine was not given them). When
            one matches, the text before it is the last delta, :class:`Finish` names it,
            the generation is cancelled and :class:`Usage` counts the tokens received
            (one chunk per token, so it may count a token or two fewer than decoded).

    Yields:
        Text and tool-call events, then one :class:`Finish` and one :class:`Usage`; or a
        :class:`Failure` that ends the run.
    """
    matcher = TextStream(stop) if stop else None
    finish: Finish | None = None
    pieces = 0
    seen = ""
    try:
        async for chunk in chunks:
            if "error" in chunk:
                yield Failure(chunk["error"])
                return
            if chunk.get("usage") is not None and not chunk.get("choices"):
                yield _usage(chunk["usage"])
                return
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    pieces += 1
                    if matcher is None:
                        yield TextDelta(text)
                    else:
                        seen += text
                        safe = matcher.push(text.encode())
                        if safe:
                            yield TextDelta(safe)
                        if matcher.stopped:
                            yield Finish("stop_sequence", _first_match(stop, seen))
                            yield Usage(None, pieces)
                            return
                for call in delta.get("tool_calls") or ():
                    index = int(call.get("index", 0))
                    function = call.get("function") or {}
                    if call.get("id") or function.get("name"):
                        yield ToolCallStart(
                            index, str(call.get("id") or ""), function.get("name") or ""
                        )
                    if function.get("arguments"):
                        yield ToolCallDelta(index, function["arguments"])
                if choice.get("finish_reason"):
                    if matcher is not None:
                        rest = matcher.flush()
                        if rest:
                            yield TextDelta(rest)
                    finish = Finish(choice["finish_reason"])
                    yield finish
        if finish is None:  # no finish chunk: treat as a natural end
            yield Finish("stop")
        yield Usage(None, pieces)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _first_match(stop: tuple[str, ...], text: str) -> str:
    """The stop string that occurs first in ``text`` (the one :class:`TextStream` cut at)."""
    found = [(text.find(s), -len(s), s) for s in stop if s and s in text]
    return min(found)[2] if found else stop[0]


async def collect(events: AsyncIterator[ChatEvent]) -> ChatAnswer:
    """A whole answer from the events of a streamed run (see :func:`chat_events`).

    Raises:
        ApiError: 500 ``inference_failed`` when the run failed.
    """
    texts: list[str] = []
    calls: dict[int, list[str]] = {}
    heads: dict[int, ToolCallStart] = {}
    finish = Finish("stop")
    usage = Usage(None, 0)
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, TextDelta):
                texts.append(event.text)
            elif isinstance(event, ToolCallStart):
                heads.setdefault(event.index, event)
                calls.setdefault(event.index, [])
            elif isinstance(event, ToolCallDelta):
                calls.setdefault(event.index, []).append(event.arguments)
            elif isinstance(event, Finish):
                finish = event
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Failure):
                message = str(event.error.get("message") or "generation failed")
                status = 500 if event.error.get("type") == "server_error" else 400
                raise ApiError(status, str(event.error.get("code") or "inference_failed"), message)
    tool_calls = [
        ToolCall(
            heads[i].id if i in heads else "", heads[i].name if i in heads else "", "".join(parts)
        )
        for i, parts in sorted(calls.items())
    ]
    return ChatAnswer(
        text="".join(texts),
        tool_calls=tool_calls,
        finish_reason=finish.reason,
        usage=usage,
        stop_sequence=finish.stop_sequence,
    )
