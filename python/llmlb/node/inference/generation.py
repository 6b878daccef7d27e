"""One request's generation: scheduler events turned into the contract's answer or events.

A :class:`Run` owns the jobs of one request (one per prompt, each with ``n`` choices),
reads their events from the scheduler thread, and produces either the whole
:class:`~llmlb.node.inference.contract.Answer` or a stream of typed events
(:class:`~llmlb.node.inference.contract.TextDelta`, tool calls, :class:`Done`, :class:`Usage`,
:class:`Error`), with tool calls split out of the text where the request offered tools.
Closing the stream (or cancelling the wait) cancels the jobs at the next decode step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llmlb.errors import ApiError
from llmlb.node.inference import tool_calls
from llmlb.node.inference.contract import (
    Answer,
    ChatEvent,
    Choice,
    Done,
    Error,
    Generation,
    TextDelta,
    TokenLogprob,
    ToolCallArgs,
    ToolCallStart,
    Usage,
)
from llmlb.node.inference.jobs import (
    DoneEvent,
    ErrorEvent,
    Event,
    Job,
    PromptLogprobEvent,
    StartEvent,
    TokenEvent,
)
from llmlb.node.inference.llama_native import Model
from llmlb.node.inference.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class Tooling:
    """How one request's answers may carry tool calls."""

    kind: str
    names: set[str]
    forced: bool
    parallel: bool


class _Calls:
    """One choice's text and tool calls, split as the text arrives.

    The answer ends at the first call that would not be returned: a second call when
    parallel calls are off, or a call identical to an earlier one (same function, same
    arguments), which is what a model does when a grammar forces calls and the model
    cannot stop (a base model repeats its call until ``max_tokens``). A call the answer was
    cut inside is returned, arguments as written so far, only when ``max_tokens`` cut it
    (``finish_reason: "length"``), as OpenAI returns a cut answer; never as text.
    """

    def __init__(self, tooling: Tooling):
        self.tooling = tooling
        self.parser = tool_calls.StreamParser(tooling.kind, tooling.names, tooling.forced)
        self.calls: list[tool_calls.ToolCall] = []
        self.ended = False

    def push(self, text: str) -> tuple[str, list[tool_calls.ToolCall]]:
        """The text to emit now and the calls to return, for a delta of the answer."""
        if self.ended:
            return "", []
        content, calls = self.parser.push(text)
        return content, self._admit(calls)

    def finish(self, text: str, reason: str) -> tuple[str, list[tool_calls.ToolCall]]:
        """The last delta of an answer that ended with ``reason``: what is left to emit."""
        content, calls = self.push(text)
        if self.ended:
            return content, calls
        rest, more = self.parser.flush(cut=reason == "length")
        more = [c for c in more if c.complete or reason == "length"]
        return content + rest, calls + self._admit(more)

    def _admit(self, calls: list[tool_calls.ToolCall]) -> list[tool_calls.ToolCall]:
        out = []
        for call in calls:
            if (self.calls and not self.tooling.parallel) or any(
                call.same_as(c) for c in self.calls
            ):
                self.ended = True
                break
            self.calls.append(call)
            out.append(call)
        return out


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    tokens: int = 0
    seen: int = 0  # tokens received so far
    calls: list[tool_calls.ToolCall] = field(default_factory=list)


def call_events(
    index: int, number: int, call: tool_calls.ToolCall, pieces: int = 3
) -> list[ChatEvent]:
    """The events of one call, as OpenAI streams it: id and name first, then the arguments
    in ``pieces`` pieces (every dialect streams the same pieces)."""
    size = max(1, -(-len(call.arguments) // pieces))
    parts = [call.arguments[i : i + size] for i in range(0, len(call.arguments), size)]
    head: list[ChatEvent] = [ToolCallStart(number, call.id, call.name, index)]
    return head + [ToolCallArgs(number, p, index) for p in parts]


class Run:
    """The events of one request's jobs, turned into an answer or a stream of events.

    Args:
        scheduler: the model's decode loop the jobs were submitted to.
        model: the model (token texts for logprobs).
        model_id: for messages.
        jobs: one per prompt.
        events: ``(job number, event)`` pairs from the jobs' ``emit``.
        generation: the validated request fields.
        echo: the prompt texts to put before each choice (completions ``echo``).
        tooling: how tool calls are told apart from text (``None``: no tools).
        on_close: called once when the run ends (its hold on the model is released).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        model: Model,
        model_id: str,
        jobs: list[Job],
        events: asyncio.Queue[tuple[int, Event]],
        generation: Generation,
        echo: list[str] | None = None,
        tooling: Tooling | None = None,
        on_close: Callable[[], None] = lambda: None,
    ):
        self.scheduler = scheduler
        self.model = model
        self.model_id = model_id
        self.tooling = tooling
        self.on_close = on_close
        self.jobs = jobs
        self.events = events
        self.generation = generation
        self.echo = echo
        self.n = generation.n
        self.choices = [_Choice() for _ in range(len(jobs) * self.n)]
        self.prompt_tokens = sum(len(j.prompt) for j in jobs)
        self.cached = 0
        self._prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in jobs]
        self._backlog: list[tuple[int, Event]] = []
        self._closed = False
        self._calls = (
            [_Calls(tooling) for _ in self.choices] if tooling is not None else None
        )

    def cancel(self) -> None:
        """Stop every job of this request (no-op for finished ones)."""
        for job in self.jobs:
            job.cancel()
        self.scheduler.wake()

    async def started(self, timeout: float) -> None:
        """Wait until the first job has its slots; 429 after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                number, event = await asyncio.wait_for(self.events.get(), max(0.0, remaining))
            except TimeoutError:
                raise ApiError(
                    429,
                    "model_overloaded",
                    f"all {self.scheduler.slots} slots of model {self.model_id!r} are busy",
                    retry_after=1,
                ) from None
            if isinstance(event, ErrorEvent):
                raise ApiError(event.status, event.code, event.message)
            self._backlog.append((number, event))
            if isinstance(event, StartEvent):
                return

    async def _events(self) -> AsyncIterator[tuple[int, Event]]:
        backlog, self._backlog = self._backlog, []
        for item in backlog:
            yield item
        while not self.finished():
            yield await self.events.get()

    def finished(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    def _logprob(self, event: TokenEvent | PromptLogprobEvent) -> TokenLogprob | None:
        if event.logprob is None:
            return None
        model = self.model
        chosen, top = event.logprob

        def entry(token: int) -> tuple[str, bytes]:
            raw = model.piece(token)
            return raw.decode("utf-8", errors="replace"), raw

        token_text, raw = entry(event.token)
        alternatives = [(*entry(t), lp) for t, lp in top[: self.generation.top_logprobs]]
        return TokenLogprob(token_text, raw, chosen, alternatives)

    def _prompt_entries(self, number: int) -> list[TokenLogprob]:
        """Logprob entries of prompt ``number``'s tokens (the first one has none)."""
        first = self.jobs[number].prompt[0]
        raw = self.model.piece(first)
        head = TokenLogprob(raw.decode("utf-8", errors="replace"), raw, None, [])
        return [head, *self._prompt_logprobs[number]]

    def _usage(self) -> Usage:
        completion = sum(c.tokens for c in self.choices)
        return Usage(self.prompt_tokens, completion, self.cached)

    def _split(
        self, index: int, text: str, reason: str | None = None
    ) -> tuple[str, list[tool_calls.ToolCall]]:
        """Choice ``index``'s text to emit and calls to return for a delta of its answer
        (``reason``: the answer ended with this delta). A choice whose answer ends at a call
        it will not return (see :class:`_Calls`) is finished here with ``tool_calls``."""
        if self._calls is None:
            return text, []
        watch = self._calls[index]
        content, calls = watch.push(text) if reason is None else watch.finish(text, reason)
        choice = self.choices[index]
        if watch.ended and choice.finish is None:
            choice.finish, choice.tokens = "tool_calls", choice.seen
        return content, calls

    def _token(self, index: int, event: TokenEvent) -> tuple[_Choice, TokenLogprob | None] | None:
        """Count a token of choice ``index``: the choice and the token's logprob entry, or
        ``None`` when the choice already ended (at a call it does not return)."""
        choice = self.choices[index]
        if choice.finish is not None:
            return None
        choice.seen += 1
        return choice, self._logprob(event)

    def _finish_reason(self, index: int) -> str:
        choice = self.choices[index]
        calls = self._calls is not None and bool(self._calls[index].calls)
        return "tool_calls" if calls and choice.finish == "stop" else choice.finish or "stop"

    async def collect(self) -> Answer:
        """The whole answer."""
        async for number, event in self._events():
            index = number * self.n + getattr(event, "index", 0)
            if isinstance(event, ErrorEvent):
                raise ApiError(event.status, event.code, event.message)
            if isinstance(event, StartEvent):
                self.cached += event.cached
            elif isinstance(event, PromptLogprobEvent):
                entry = self._logprob(event)
                if entry is not None:
                    self._prompt_logprobs[number].append(entry)
            elif isinstance(event, TokenEvent):
                if (token := self._token(index, event)) is None:
                    continue
                choice, entry = token
                if entry is not None:
                    choice.logprobs.append(entry)
                text, calls = self._split(index, event.text)
                choice.text.append(text)
                choice.calls.extend(calls)
            elif isinstance(event, DoneEvent):
                choice = self.choices[index]
                if choice.finish is not None:
                    continue
                text, calls = self._split(index, event.text, event.finish_reason)
                choice.text.append(text)
                choice.calls.extend(calls)
                choice.finish = choice.finish or event.finish_reason
                choice.tokens = event.tokens
        out = []
        for index, choice in enumerate(self.choices):
            prefix = self.echo[index // self.n] if self.echo else ""
            logprobs = None
            if self.generation.logprobs:
                logprobs = choice.logprobs
                if self.echo:
                    logprobs = [*self._prompt_entries(index // self.n), *logprobs]
            text = prefix + "".join(choice.text)
            if choice.calls:
                text = text.strip()
            out.append(
                Choice(index, text, self._finish_reason(index), list(choice.calls), logprobs)
            )
        return Answer(out, self._usage())

    def close(self) -> None:
        """Cancel what still runs and give the request's hold on the model back (once)."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        self.on_close()

    async def stream(self) -> AsyncIterator[ChatEvent]:
        """Events as tokens arrive; an :class:`Error` ends a failed run, a :class:`Usage`
        one that did not fail."""
        made: list[int] = [0] * len(self.choices)

        def pieces(index: int, text: str, reason: str | None = None) -> list[ChatEvent]:
            """Events for a delta of choice ``index``: its text, then its calls."""
            content, calls = self._split(index, text, reason)
            out: list[ChatEvent] = [TextDelta(content, index)] if content else []
            for call in calls:
                out.extend(call_events(index, made[index], call))
                made[index] += 1
            return out

        try:
            if self.echo:
                for index in range(len(self.choices)):
                    yield TextDelta(self.echo[index // self.n], index)
            async for number, event in self._events():
                index = number * self.n + getattr(event, "index", 0)
                if isinstance(event, ErrorEvent):
                    yield Error(event.message, event.status, event.code)
                    return
                if isinstance(event, StartEvent):
                    self.cached += event.cached
                elif isinstance(event, TokenEvent):
                    if (token := self._token(index, event)) is None:
                        continue
                    choice, entry = token
                    if not event.text and entry is None:
                        continue
                    if entry is not None and self._calls is None:
                        yield TextDelta(event.text, index, (entry,))
                        continue
                    for item in pieces(index, event.text):
                        yield item
                    if choice.finish is not None:
                        yield Done(self._finish_reason(index), index)
                elif isinstance(event, DoneEvent):
                    choice = self.choices[index]
                    if choice.finish is not None:
                        continue
                    for item in pieces(index, event.text, event.finish_reason):
                        yield item
                    choice.finish = choice.finish or event.finish_reason
                    choice.tokens = event.tokens
                    yield Done(self._finish_reason(index), index)
            yield self._usage()
        finally:
            self.close()


class ChatStream:
    """A streamed run's typed events; closing it, even unstarted, ends the run.

    Attributes:
        choices: how many choices the run streams (prompts × ``n``).
        prompt_tokens: the prompt's tokens (all prompts together).
    """

    def __init__(self, run: Run):
        self._run = run
        self._events = run.stream()
        self.choices = len(run.choices)
        self.prompt_tokens = run.prompt_tokens

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> ChatEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop generating and release the slots."""
        try:
            await self._events.aclose()  # type: ignore[attr-defined]
        finally:
            self._run.close()
