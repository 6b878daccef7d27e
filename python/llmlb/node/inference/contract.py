"""The typed contract between the API dialects and the engine.

Each dialect (OpenAI chat and completions, Responses, Anthropic Messages) parses its body
into a :class:`ChatRequest` (or :class:`CompletionRequest`, :class:`EmbeddingRequest`); the
engine runs it and answers with typed events (:class:`TextDelta`, :class:`ToolCallStart`,
:class:`ToolCallArgs`, :class:`Done`, :class:`Usage`, :class:`Error`) when streaming, or a
whole :class:`Answer`. Each dialect renders those in its own wire shape; no dialect goes
through another's.

Fields checked only once the model is known (context length, tool schemas and response
formats against the grammar budget) are named in errors by :class:`FieldPaths`, the paths
as the client sent them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmlb.errors import ApiError
from llmlb.node.inference.sampling import SamplingParams
from llmlb.node.inference.text_stream import TextStream
from llmlb.node.inference.tool_calls import Tool, ToolCall

__all__ = [
    "Answer",
    "ChatEvent",
    "ChatRequest",
    "Choice",
    "CompletionRequest",
    "Done",
    "EmbeddingRequest",
    "Embeddings",
    "Error",
    "FieldPaths",
    "Generation",
    "TextDelta",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallArgs",
    "ToolCallStart",
    "Usage",
    "collect",
    "cut_at_stop",
]


# -- requests --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generation:
    """What a chat or completion request asks the engine to generate.

    Attributes:
        sampling: sampler settings (token ids in ``logit_bias`` still unchecked, no grammar
            yet: the engine checks the one and adds the other).
        n: choices per prompt.
        max_tokens: tokens per choice (``None``: the node's default cap).
        stop: stop strings.
        stream, include_usage: stream events, and (OpenAI) a final usage chunk.
        logprobs: return logprobs; ``top_logprobs`` alternatives per token.
        grammar_schema: ``None``, ``"json_object"``, or a JSON schema (dict) to constrain to.
        user: the end user's id (logged with the request).
    """

    sampling: SamplingParams
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    grammar_schema: dict[str, Any] | str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class FieldPaths:
    """The client's names of the fields checked once the model is known.

    Attributes:
        messages: the prompt (context overflow, an empty rendered prompt).
        max_tokens: the answer's length (context overflow).
        tools: the tools as a whole (a forced call's grammar).
        tool_schema: one tool's parameter schema, ``{}`` standing for its index.
        response_format: the JSON schema of a structured answer.
    """

    messages: str = "messages"
    max_tokens: str = "max_tokens"
    tools: str = "tools"
    tool_schema: str = "tools[{}].function.parameters"
    response_format: str = "response_format"

    def schema_of(self, index: int) -> str:
        """The path of tool ``index``'s parameter schema."""
        return self.tool_schema.format(index)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat request, whatever dialect it came in.

    Attributes:
        messages: the conversation in the chat template's shape (``role``, text ``content``,
            an assistant's ``tool_calls`` with arguments as objects, a tool result's
            ``tool_call_id``).
        generation: sampling, limits, stop strings, response format, logprobs, n, stream.
        tools: the function tools offered (empty: none).
        tool_choice: ``none``, ``auto``, ``required``, or the one tool's name that must be
            called.
        parallel_tool_calls: several calls in one answer allowed.
        paths: the client's names of the fields the engine may still refuse.
    """

    messages: list[dict[str, Any]]
    generation: Generation
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    paths: FieldPaths = FieldPaths()

    @property
    def forced_tools(self) -> list[Tool]:
        """The tools the answer must call (empty unless ``required`` or a named tool)."""
        if self.tool_choice == "required":
            return self.tools
        if self.tool_choice in ("auto", "none"):
            return []
        return [t for t in self.tools if t.name == self.tool_choice]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated ``/v1/completions`` body: one or more prompts (text or token ids)."""

    prompts: list[str | list[int]]
    generation: Generation
    echo: bool = False
    suffix: str | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` body."""

    inputs: list[str | list[int]]
    base64: bool = False
    dimensions: int | None = None


# -- events ----------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """One token's logprob entry (with its most likely alternatives); ``logprob`` is
    ``None`` for a prompt's first token, which nothing predicts."""

    token: str
    raw: bytes
    logprob: float | None
    top: list[tuple[str, bytes, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of choice ``index``'s text (with its token's logprobs when asked for; the
    text may then be empty)."""

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """Tool call number ``call`` of choice ``index`` begins: its id and function name."""

    call: int
    id: str
    name: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class ToolCallArgs:
    """A piece of tool call ``call``'s JSON arguments (choice ``index``)."""

    call: int
    arguments: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class Done:
    """Choice ``index`` ended: ``stop``, ``length`` or ``tool_calls``; or ``stop_sequence``
    with the matched string when :func:`cut_at_stop` matched it."""

    reason: str
    index: int = 0
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of the run (the last event of a run that did not fail); the prompt's is
    ``None`` when :func:`cut_at_stop` cut the run before the engine counted it."""

    prompt_tokens: int | None
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Error:
    """The run failed mid-answer (the event that ends it)."""

    message: str
    status: int = 500
    code: str = "inference_failed"


ChatEvent = TextDelta | ToolCallStart | ToolCallArgs | Done | Usage | Error


@dataclass(slots=True)
class Choice:
    """One choice of a whole answer.

    Attributes:
        text: its text (an echoed prompt first; stripped when it made calls).
        finish_reason: ``stop``, ``length``, ``tool_calls`` or ``stop_sequence``.
        tool_calls: the calls it made.
        logprobs: its tokens' entries when asked for (a completion's echoed prompt first).
        stop_sequence: the stop string that ended it (:func:`collect` after
            :func:`cut_at_stop`).
    """

    index: int
    text: str
    finish_reason: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None


@dataclass(slots=True)
class Answer:
    """A whole (non-streamed) answer: every choice, and the usage."""

    choices: list[Choice]
    usage: Usage


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The vectors of an embedding request, one per input, and the tokens read."""

    vectors: list[Any]
    prompt_tokens: int


# -- helpers over events -----------------------------------------------------------------


async def cut_at_stop(
    events: AsyncIterator[ChatEvent], stop: tuple[str, ...]
) -> AsyncIterator[ChatEvent]:
    """The events of a streamed run (one choice), with ``stop`` strings matched here, so
    that the answer can name the one that ended it.

    When one matches, the text before it is the last delta, :class:`Done` names it, the run
    is closed (which cancels the generation) and :class:`Usage` counts the text deltas
    received (one per token, so it may count a token or two fewer than decoded).
    """
    matcher = TextStream(stop)
    pieces = 0
    seen = ""
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                if event.index != 0 or not event.text:
                    continue
                pieces += 1
                seen += event.text
                safe = matcher.push(event.text.encode())
                if safe:
                    yield TextDelta(safe)
                if matcher.stopped:
                    yield Done("stop_sequence", 0, _first_match(stop, seen))
                    yield Usage(None, pieces)
                    return
            elif isinstance(event, Done):
                if event.index != 0:
                    continue
                rest = matcher.flush()
                if rest:
                    yield TextDelta(rest)
                yield event
            else:
                yield event
    finally:
        with contextlib.suppress(AttributeError):
            await events.aclose()  # type: ignore[attr-defined]


def _first_match(stop: tuple[str, ...], text: str) -> str:
    """The stop string that occurs first in ``text`` (the one :class:`TextStream` cut at)."""
    found = [(text.find(s), -len(s), s) for s in stop if s and s in text]
    return min(found)[2] if found else stop[0]


async def collect(events: AsyncIterator[ChatEvent]) -> Answer:
    """A whole answer (its first choice) from the events of a streamed run.

    Raises:
        ApiError: the run's :class:`Error` (500 for a server error, else 400).
    """
    texts: list[str] = []
    args: dict[int, list[str]] = {}
    heads: dict[int, ToolCallStart] = {}
    done = Done("stop")
    usage = Usage(None, 0)
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if getattr(event, "index", 0) != 0:
                continue
            if isinstance(event, TextDelta):
                texts.append(event.text)
            elif isinstance(event, ToolCallStart):
                heads.setdefault(event.call, event)
                args.setdefault(event.call, [])
            elif isinstance(event, ToolCallArgs):
                args.setdefault(event.call, []).append(event.arguments)
            elif isinstance(event, Done):
                done = event
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Error):
                status = 500 if event.status >= 500 else 400
                raise ApiError(status, event.code or "inference_failed", event.message)
    calls = [
        ToolCall(
            heads[i].name if i in heads else "",
            "".join(parts),
            id=heads[i].id if i in heads else "",
        )
        for i, parts in sorted(args.items())
    ]
    choice = Choice(0, "".join(texts), done.reason, calls, stop_sequence=done.stop_sequence)
    return Answer([choice], usage)
