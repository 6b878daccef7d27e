"""One request's generation: scheduler events turned into an OpenAI answer or stream.

A :class:`Run` owns the jobs of one request (one per prompt, each with ``n`` choices),
reads their events from the scheduler thread, and produces either the whole answer or
stream chunks — with tool calls split out of the text where the request offered tools.
Closing the stream (or cancelling the wait) cancels the jobs at the next decode step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from llmlb.errors import ApiError
from llmlb.node.api import openai_request as req
from llmlb.node.api.openai_response import (
    SSE_DONE,
    Shaper,
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    sse,
    tool_call,
    tool_call_deltas,
    usage,
)
from llmlb.node.inference import tool_calls
from llmlb.node.inference.llama_native import Model
from llmlb.node.inference.scheduler import (
    DoneEvent,
    ErrorEvent,
    Event,
    Job,
    PromptLogprobEvent,
    Scheduler,
    StartEvent,
    TokenEvent,
)


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
    calls: list[dict[str, Any]] = field(default_factory=list)


class Run:
    """The events of one request's jobs, turned into an answer or a stream.

    Args:
        scheduler: the model's decode loop the jobs were submitted to.
        model: the model (token texts for logprobs).
        model_id: for messages.
        jobs: one per prompt.
        events: ``(job number, event)`` pairs from the jobs' ``emit``.
        generation: the validated request fields.
        shaper: the answer's wire shapes.
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
        generation: req.Generation,
        shaper: Shaper,
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
        self.shaper = shaper
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

    def _usage(self) -> dict[str, Any]:
        completion = sum(c.tokens for c in self.choices)
        return usage(self.prompt_tokens, completion, self.cached)

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

    def _finish_reason(self, index: int) -> str:
        choice = self.choices[index]
        calls = self._calls is not None and bool(self._calls[index].calls)
        return "tool_calls" if calls and choice.finish == "stop" else choice.finish or "stop"

    async def collect(self) -> dict[str, Any]:
        """The whole answer."""
        async for number, event in self._events():
            index = number * self.n + getattr(event, "index", 0)
            if isinstance(event, ErrorEvent):
                raise ApiError(event.status, event.code, event.message)
            if isinstance(event, StartEvent):
                self.cached += event.cached
            elif isinstance(event, PromptLogprobEvent):
                self._prompt_logprobs[number].append(self._logprob(event))
            elif isinstance(event, TokenEvent):
                choice = self.choices[index]
                if choice.finish is not None:
                    continue  # ended at a call it does not return
                choice.seen += 1
                entry = self._logprob(event)
                if entry is not None:
                    choice.logprobs.append(entry)
                text, calls = self._split(index, event.text)
                choice.text.append(text)
                choice.calls.extend(tool_call(c) for c in calls)
            elif isinstance(event, DoneEvent):
                choice = self.choices[index]
                if choice.finish is not None:
                    continue
                text, calls = self._split(index, event.text, event.finish_reason)
                choice.text.append(text)
                choice.calls.extend(tool_call(c) for c in calls)
                choice.finish = choice.finish or event.finish_reason
                choice.tokens = event.tokens
        out = []
        for index, choice in enumerate(self.choices):
            prefix = self.echo[index // self.n] if self.echo else ""
            logprobs = None
            if self.generation.logprobs and self.shaper.chat:
                logprobs = chat_logprobs(choice.logprobs)
            elif self.generation.logprobs:
                entries = choice.logprobs
                if self.echo:
                    entries = [*self._prompt_entries(index // self.n), *entries]
                logprobs = completion_logprobs(entries, 0 if self.echo else len(prefix))
            text = prefix + "".join(choice.text)
            if choice.calls:
                text = text.strip()
            finish = self._finish_reason(index)
            out.append(self.shaper.choice(index, text, finish, logprobs, choice.calls or None))
        return self.shaper.answer(out, self._usage())

    def close(self) -> None:
        """Cancel what still runs and give the request's hold on the model back (once)."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        self.on_close()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Stream chunks as tokens arrive (an ``{"error": …}`` chunk ends a failed run)."""
        shaper = self.shaper
        made: list[int] = [0] * len(self.choices)

        def pieces(index: int, text: str, reason: str | None = None) -> list[dict[str, Any]]:
            """Chunks for a delta of choice ``index``: its text, then its calls."""
            content, calls = self._split(index, text, reason)
            out = [shaper.chunk(index, content)] if content else []
            for call in calls:
                for delta in tool_call_deltas(made[index], call):
                    out.append(shaper.chunk(index, None, tool_calls=[delta]))
                made[index] += 1
            return out

        try:
            if shaper.chat:
                for index in range(len(self.choices)):
                    yield shaper.chunk(index, "", role=True)
            elif self.echo:
                for index in range(len(self.choices)):
                    yield shaper.chunk(index, self.echo[index // self.n])
            async for number, event in self._events():
                index = number * self.n + getattr(event, "index", 0)
                if isinstance(event, ErrorEvent):
                    kind = "server_error" if event.status >= 500 else "invalid_request_error"
                    error = {"message": event.message, "type": kind, "code": event.code}
                    yield {"error": error}
                    return
                if isinstance(event, StartEvent):
                    self.cached += event.cached
                elif isinstance(event, TokenEvent):
                    choice = self.choices[index]
                    if choice.finish is not None:
                        continue  # ended at a call it does not return
                    choice.seen += 1
                    entry = self._logprob(event)
                    if not event.text and entry is None:
                        continue
                    if entry is not None and self._calls is None:
                        logprobs = (
                            chat_logprobs([entry]) if shaper.chat
                            else completion_logprobs([entry], 0)
                        )
                        yield shaper.chunk(index, event.text, logprobs=logprobs)
                        continue
                    for chunk in pieces(index, event.text):
                        yield chunk
                    if choice.finish is not None:
                        yield shaper.chunk(index, None, finish=self._finish_reason(index))
                elif isinstance(event, DoneEvent):
                    choice = self.choices[index]
                    if choice.finish is not None:
                        continue
                    for chunk in pieces(index, event.text, event.finish_reason):
                        yield chunk
                    choice.finish = choice.finish or event.finish_reason
                    choice.tokens = event.tokens
                    yield shaper.chunk(index, None, finish=self._finish_reason(index))
            if self.generation.include_usage:
                yield shaper.usage_chunk(self._usage())
        finally:
            self.close()


class EventStream:
    """A streamed run as SSE bytes (``data: [DONE]`` after a run that did not fail) or as
    chunk dicts; closing it, even unstarted, ends the run."""

    def __init__(self, run: Run, as_sse: bool):
        self._run = run
        self._chunks = run.chunks()
        self._as_sse = as_sse
        self._failed = False
        self._ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        if self._ended:
            raise StopAsyncIteration
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._ended = True
            if self._as_sse and not self._failed:
                return SSE_DONE
            raise
        if "error" in chunk:
            self._failed = True
        return sse(chunk) if self._as_sse else chunk

    async def aclose(self) -> None:
        """Stop generating and release the slots."""
        try:
            await self._chunks.aclose()
        finally:
            self._run.close()
