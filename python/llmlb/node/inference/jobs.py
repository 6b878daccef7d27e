"""What a scheduler is given and what it gives back: jobs, their events, limits, statistics.

A :class:`Job` is one generation request (a tokenised prompt, ``n`` choices, sampler
settings, a callback); the scheduler thread calls its ``emit`` with each :data:`Event`.
Kept apart from :mod:`.scheduler` (the decode loop) so that the engine and the tests can
build jobs and read events without the loop's internals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmlb.node.inference.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token of choice ``index``: its text delta and, if asked, logprobs."""

    index: int
    token: int
    text: str
    logprob: tuple[float, list[tuple[int, float]]] | None = None


@dataclass(frozen=True, slots=True)
class PromptLogprobEvent:
    """The logprob of prompt token ``position`` given the tokens before it."""

    position: int
    token: int
    logprob: tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True, slots=True)
class StartEvent:
    """The job got its slots: ``cached`` of its ``prompt`` tokens were reused, from a slot
    that still held them (``source`` ``"slot"``) or restored from the RAM cache (``"ram"``)."""

    prompt: int
    cached: int
    source: str = "slot"


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """Choice ``index`` ended (``stop`` or ``length``) after ``tokens`` tokens; ``text`` is
    the last held-back text."""

    index: int
    finish_reason: str
    tokens: int
    text: str = ""


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The job failed: inside llama.cpp (500), or because of what it asked for (a 4xx)."""

    message: str
    status: int = 500
    code: str = "inference_failed"


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """Time bounds of the decode loop.

    Attributes:
        grammar_token_budget_s: the most one sequence's grammar may spend on one token.
        stall_floor_s, stall_factor: a step is stalled past ``max(floor, factor × the
            usual step)``: the watchdog logs and counts it. A sampler still running after
            ``max(floor, grammar_token_budget_s)`` has its request ended by the watchdog.
        close_timeout_s: how long :meth:`Scheduler.close` waits for the loop to stop.
    """

    grammar_token_budget_s: float = 1.0
    stall_floor_s: float = 3.0
    stall_factor: float = 50.0
    close_timeout_s: float = 2.0


Event = TokenEvent | StartEvent | DoneEvent | ErrorEvent | PromptLogprobEvent


@dataclass(eq=False)
class Job:
    """One generation request: a tokenised prompt and ``n`` choices.

    Attributes:
        prompt: token ids (never empty).
        max_tokens: generated tokens per choice at most.
        sampling: sampler settings (choice ``i`` draws with seed + i).
        emit: called from the scheduler thread with each :data:`Event`.
        n: choices.
        stop: strings that end a choice (never emitted).
        stop_tokens: token ids that end a choice besides the model's end-of-generation ones.
        top_logprobs: ``None`` for no logprobs, else how many alternatives per token.
        prompt_logprobs: logprobs of the prompt's own tokens too (completions ``echo``);
            the whole prompt is then evaluated, no cached prefix reused.
        special_tokens: control tokens whose text is part of the answer (tool-call markers).
        prefix_keys: the request's prefix keys (:mod:`llmlb.prefix_keys`): the slot holding
            its prompt holds them in the :class:`CacheDirectory`.
        on_answer: given the text of choice 0 once it ended, the key of the conversation
            continued by that answer (held by its slot too), or ``None``.
        on_release: called once (from the scheduler thread) when the job holds no slot any
            more and never will: finished, failed, cancelled, or dropped while queued.
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_tokens: frozenset[int] = frozenset()
    top_logprobs: int | None = None
    prompt_logprobs: bool = False
    special_tokens: frozenset[int] = frozenset()
    prefix_keys: tuple[int, ...] = ()
    on_answer: Callable[[str], int | None] | None = None
    on_release: Callable[[], Any] | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    held: int = 0  # sequences running now
    released: bool = False

    def cancel(self) -> None:
        """Leave the batch at the next step (or never start)."""
        self.cancelled = True

    def fail(self, event: ErrorEvent) -> None:
        """End with ``event``: the job leaves the batch at the next step (any thread)."""
        if not self.cancelled:
            self.cancel()
            self.emit(event)

    def release(self) -> None:
        """The job holds no slot any more and never will: call ``on_release`` once."""
        if not self.released:
            self.released = True
            if self.on_release is not None:
                self.on_release()


@dataclass
class SchedulerStats:
    """What the scheduler did, for metrics and tests."""

    steps: int = 0
    split_steps: int = 0  # steps whose sequence ids were not one run (several compute passes)
    stalled_steps: int = 0
    peak_sequences: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ram_cached_tokens: int = 0  # of cached_tokens, restored from the RAM cache
    saves: int = 0
    restores: int = 0
    completion_tokens: int = 0
