"""Continuous batching over one llama.cpp context: every running sequence, one decode a step.

One :class:`Scheduler` (and one thread) per loaded model. The context has one sequence per
slot. Each step the thread builds a single ``llama_batch`` from every running sequence — one
token for each sequence that is generating, a prompt chunk for sequences that are starting
(at most ``n_ubatch`` tokens while others generate, so a long prompt delays them by one
chunk at most) — and calls ``llama_decode`` once. Jobs join at the next step; a finished or
cancelled sequence leaves at once. The batch lists sequences in id order and a new job takes
a free slot next to the running ones: with one KV stream per sequence, llama.cpp computes
only runs of consecutive ids together, and a scrambled order split a step into many passes.

Prompt reuse: each slot remembers the tokens its KV cells hold. A new job takes the free
slot sharing the longest prefix with its prompt and evaluates only the rest. Before a slot
is overwritten, its state is saved in the host-RAM :class:`PromptCache`; a job whose prompt
shares a longer prefix with a saved state than with any free slot has that state restored
into its slot. ``n > 1`` evaluates the prompt once, then copies its cells to the other
choices' sequences.

Bounds: a sequence whose grammar took longer than ``grammar_token_budget_s`` to pick one
token ends with a 400 ``grammar_too_complex`` and frees its slot; the others go on. A
watchdog thread notices a step that runs far longer than the model's usual step, logs it,
and ends the request whose sampler is running (its client hears at once; the slot is freed
when llama.cpp returns). :meth:`Scheduler.close` waits a bounded time for the loop.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from llmlb.node.inference.cache_directory import CacheDirectory
from llmlb.node.inference.jobs import (
    DoneEvent,
    ErrorEvent,
    Job,
    PromptLogprobEvent,
    SchedulerLimits,
    SchedulerStats,
    StartEvent,
    TokenEvent,
)
from llmlb.node.inference.llama_native import Batch, Context, Model
from llmlb.node.inference.prompt_cache import CachedPrompt, PromptCache, common_prefix
from llmlb.node.inference.sampling import Sampler, logprobs
from llmlb.node.inference.slots import Slot, fresh_slot
from llmlb.node.inference.text_stream import TextStream

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Running:
    job: Job
    index: int
    slot: Slot
    sampler: Sampler
    text: TextStream
    prompt_left: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, not yet decoded
    generated: int = 0
    answer: list[str] = field(default_factory=list)  # text emitted (choice 0, when asked)
    primary: bool = True  # evaluates the prompt (the other choices copy its cells)


# The priority the router passed with the request (``X-Llmlb-Priority``: high, normal, low),
# set by the node's HTTP handler: a waiting job of a higher priority starts first.
request_priority: ContextVar[str | None] = ContextVar("request_priority", default=None)
_RANKS = {"high": 0, "normal": 1, "low": 2}


class Scheduler:
    """The decode loop of one model.

    Args:
        model: the loaded weights.
        ctx: its context (``ctx.shape.n_seq`` sequences).
        on_step: called after each decode with (sequences in the batch, tokens generated).
        limits: time bounds of the loop.
        on_stall: called (from the watchdog thread) with a stalled step's seconds so far.
        prompt_cache: where slot states are saved before their slot is reused (``None``:
            reuse ends with the slots).
        on_cache: called with ``("slot" | "ram", cached tokens)`` as each job starts and
            ``("save" | "restore" | "evict", count)`` as the RAM cache changes.
        directory: where the prefix keys its slots and RAM cache hold are kept, under
            ``model_id``.
    """

    def __init__(
        self,
        model: Model,
        ctx: Context,
        on_step: Callable[[int, int, int], Any] | None = None,
        limits: SchedulerLimits | None = None,
        on_stall: Callable[[float], Any] | None = None,
        prompt_cache: PromptCache | None = None,
        on_cache: Callable[[str, int], Any] | None = None,
        directory: CacheDirectory | None = None,
        model_id: str = "",
    ):
        self.model = model
        self.ctx = ctx
        self.n_ctx_seq = ctx.n_ctx_seq
        self._slots = [Slot(seq) for seq in range(ctx.shape.n_seq)]
        self._batch = Batch(ctx.shape.n_batch)
        self._pending: deque[Job] = deque()
        self._ranks: weakref.WeakKeyDictionary[Job, int] = weakref.WeakKeyDictionary()
        self._running: list[_Running] = []
        self._cond = threading.Condition()
        self._closing = False
        self._on_step = on_step or (lambda _seqs, _prompt, _gen: None)
        self._on_stall = on_stall or (lambda _seconds: None)
        self.limits = limits or SchedulerLimits()
        self.prompt_cache = prompt_cache
        self._on_cache = on_cache or (lambda _event, _n: None)
        self.directory = directory or CacheDirectory()
        self.model_id = model_id
        if prompt_cache is not None:
            prompt_cache.on_drop = lambda entry: self.directory.drop(("ram", id(entry)))
        self.stats = SchedulerStats()
        self._step_started = 0.0  # monotonic start of the step running now, 0 between steps
        self._usual_step = 0.0  # moving average of step durations
        self._sampling: _Running | None = None  # whose sampler runs now
        self._sampling_since = 0.0  # when it started
        self._thread = threading.Thread(target=self._loop, name="llama-decode", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(
            target=self._watch, name="llama-watchdog", daemon=True
        )
        self._watchdog.start()

    # -- called from other threads ---------------------------------------------------

    @property
    def slots(self) -> int:
        """Sequences this context serves at once."""
        return len(self._slots)

    def submit(self, job: Job) -> None:
        """Queue ``job``, behind the waiting jobs of its priority or a higher one
        (:data:`request_priority`); it starts when ``job.n`` slots are free."""
        rank = _RANKS.get(request_priority.get() or "normal", 1)
        with self._cond:
            if self._closing:
                raise RuntimeError("scheduler is closed")
            pending, ranks = self._pending, self._ranks
            if rank != 1:
                ranks[job] = rank
            if rank == 2 or not ranks:
                pending.append(job)
            else:  # before the first waiting job of a lower priority
                for index, queued in enumerate(pending):
                    if ranks.get(queued, 1) > rank:
                        pending.insert(index, job)
                        break
                else:
                    pending.append(job)
            self._cond.notify()

    def waiting(self) -> int:
        """Jobs queued for slots."""
        return sum(1 for job in list(self._pending) if not job.cancelled)

    def free_slots(self) -> int:
        """Slots no job holds right now."""
        return sum(1 for slot in self._slots if not slot.busy)

    def active(self) -> int:
        """Jobs holding slots now."""
        return len({id(r.job) for r in list(self._running)})

    def wake(self) -> None:
        """Make the loop look at cancellations now."""
        with self._cond:
            self._cond.notify()

    def close(self) -> bool:
        """Stop the loop (running jobs end with an error) and free the context's batch.

        Returns:
            Whether the loop stopped within ``limits.close_timeout_s``; if not, it is still
            inside llama.cpp and the context must not be freed under it.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=self.limits.close_timeout_s)
        return not self._thread.is_alive()

    # -- the watchdog ----------------------------------------------------------------

    def _watch(self) -> None:
        reported = 0.0  # the start of the step already logged and counted
        while True:
            with self._cond:
                if self._closing:
                    return
            started, limits = self._step_started, self.limits
            now = time.monotonic()
            if started and started != reported:
                spent = now - started
                if spent > max(limits.stall_floor_s, limits.stall_factor * self._usual_step):
                    reported = started
                    self._stalled(spent)
            running, sampling_since = self._sampling, self._sampling_since
            bound = max(limits.stall_floor_s, limits.grammar_token_budget_s)
            if running is not None and not running.job.cancelled and now - sampling_since > bound:
                _end_slow_sampler(running, now - sampling_since, still_running=True)
            time.sleep(min(0.25, limits.stall_floor_s / 4))

    def _stalled(self, spent: float) -> None:
        self.stats.stalled_steps += 1
        logger.warning("decode step stalled for %.1fs (usual %.3fs)", spent, self._usual_step)
        self._on_stall(spent)

    # -- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._has_work():
                        self._cond.wait()
                    if self._closing:
                        break
                self._step()
        except BaseException as exc:  # noqa: BLE001 - every job must hear about it
            logger.exception("decode loop failed")
            self._fail_all(f"decode loop failed: {exc}")
        finally:
            self._fail_all("the model was unloaded")
            self._batch.close()
            self.directory.drop_model(self.model_id)

    def _has_work(self) -> bool:
        return bool(self._running) or bool(self._pending)

    def _step(self) -> None:
        self._step_started = time.monotonic()
        try:
            self._decode_step()
        finally:
            spent = time.monotonic() - self._step_started
            self._step_started = 0.0
            self._sampling = None
            usual = self._usual_step
            self._usual_step = spent if not usual else 0.9 * usual + 0.1 * min(spent, 10 * usual)

    def _decode_step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return
        generating = [r for r in self._running if r.next_token >= 0]
        chunks = self._prompt_chunks(len(generating))
        batch = self._batch
        batch.clear()
        outputs: list[tuple[_Running, int]] = []
        scored: list[tuple[_Running, int, int, int]] = []  # run, first row, position, count
        # In sequence order: with one KV stream per sequence, llama.cpp puts into one compute
        # pass only sequences whose ids follow each other in the batch (seq, seq + 1, …); any
        # other order splits a step into as many passes as there are runs of ids.
        work: list[tuple[_Running, list[int] | None]] = [(r, None) for r in generating]
        work += chunks
        work.sort(key=lambda item: item[0].slot.seq)
        for r, take in work:
            pos = len(r.slot.tokens)
            if take is None:
                outputs.append((r, batch.add(r.next_token, pos, r.slot.seq, True)))
                continue
            last = len(take) == len(r.prompt_left)
            first = batch.n
            for j, token in enumerate(take):
                out = r.job.prompt_logprobs or (last and j == len(take) - 1)
                index = batch.add(token, pos + j, r.slot.seq, out)
            if r.job.prompt_logprobs:
                scored.append((r, first, pos, len(take)))
            if last:
                outputs.append((r, index))
        if batch.n == 0:
            return
        status = self.ctx.decode(batch)
        if status != 0:
            self._fail_batch(generating, chunks, status)
            return
        for r, first, pos, count in scored:
            self._score_prompt(r, first, pos, count)
        prompt_tokens = 0
        for r, take in chunks:
            r.slot.tokens.extend(take)
            del r.prompt_left[: len(take)]
            prompt_tokens += len(take)
        for r in generating:
            r.slot.tokens.append(r.next_token)
        self.stats.steps += 1
        seqs = [r.slot.seq for r, _ in work]
        if any(b != a + 1 for a, b in zip(seqs, seqs[1:], strict=False)):
            self.stats.split_steps += 1
        sequences = len(generating) + len(chunks)
        self.stats.peak_sequences = max(self.stats.peak_sequences, sequences)
        self.stats.prompt_tokens += prompt_tokens
        generated = 0
        for r, index in outputs:
            if r.primary and r.generated == 0 and r.job.n > 1:
                self._fork(r)
            for choice in self._choices_sharing(r):
                generated += self._advance(choice, index)
        self.stats.completion_tokens += generated
        self._on_step(sequences, prompt_tokens, generated)

    def _prompt_chunks(self, generating: int) -> list[tuple[_Running, list[int]]]:
        """The prompt tokens each starting sequence evaluates this step, first come first
        served, beside ``generating`` sequences' one token each (at most ``n_ubatch`` prompt
        tokens then, so that a long prompt delays them by one pass at most)."""
        shape = self.ctx.shape
        budget = shape.n_batch - generating
        if generating:
            budget = min(budget, shape.n_ubatch)
        chunks: list[tuple[_Running, list[int]]] = []
        rows = generating
        for r in self._running:
            if budget <= 0:
                break
            if not r.primary or not r.prompt_left:
                continue
            size = budget
            if r.job.prompt_logprobs:
                size = min(size, shape.n_outputs - rows)  # every token is an output row
                if size <= 0:
                    continue
            take = r.prompt_left[:size]
            if r.job.prompt_logprobs:
                rows += len(take)
            elif len(take) == len(r.prompt_left):
                rows += 1
            chunks.append((r, take))
            budget -= len(take)
        return chunks

    def _score_prompt(self, r: _Running, first: int, pos: int, count: int) -> None:
        """Emit the logprob of each prompt token that rows ``first…`` predict."""
        prompt, top = r.job.prompt, r.job.top_logprobs or 0
        for j in range(count):
            target = pos + j + 1
            if target >= len(prompt):
                break  # the last prompt token predicts the first generated one
            info = logprobs(self.ctx.logits(first + j), prompt[target], top)
            r.job.emit(PromptLogprobEvent(target, prompt[target], info))

    def _choices_sharing(self, r: _Running) -> list[_Running]:
        """``r`` and, right after its prompt, the other choices that copied its cells."""
        if r.primary and r.generated == 0 and r.job.n > 1:
            return [x for x in self._running if x.job is r.job]
        return [r]

    def _fork(self, r: _Running) -> None:
        for other in self._running:
            if other.job is r.job and other is not r:
                self.ctx.seq_rm(other.slot.seq)
                self.ctx.seq_cp(r.slot.seq, other.slot.seq)
                other.slot.tokens = list(r.slot.tokens)

    def _advance(self, r: _Running, index: int) -> int:
        """Sample ``r``'s next token from output row ``index``; 1 if one was generated."""
        job = r.job
        if job.cancelled:  # ended this step (another choice's grammar, the watchdog)
            return 0
        if job.max_tokens == 0:  # echo only: the prompt was all that was asked for
            self._finish(r, "length")
            return 0
        started = self._sampling_since = time.monotonic()
        self._sampling = r
        token = r.sampler.sample(self.ctx, index)
        self._sampling = None
        if r.sampler.grammar is not None:
            spent = time.monotonic() - started
            if spent > self.limits.grammar_token_budget_s:
                _end_slow_sampler(r, spent, still_running=False)
                return 0
        info = None
        if job.top_logprobs is not None:
            info = logprobs(self.ctx.logits(index), token, job.top_logprobs)
        r.generated += 1
        if self.model.is_eog(token) or token in job.stop_tokens:
            self._finish(r, "stop")
            return 1
        text = r.text.push(self.model.piece(token, special=token in job.special_tokens))
        job.emit(TokenEvent(r.index, token, text, info))
        if r.index == 0 and job.on_answer is not None:
            r.answer.append(text)
        if r.text.stopped:
            self._finish(r, "stop")
        elif r.generated >= job.max_tokens or len(r.slot.tokens) + 1 >= self.n_ctx_seq:
            self._finish(r, "length")
        else:
            r.next_token = token
        return 1

    def _finish(self, r: _Running, reason: str) -> None:
        tail = r.text.flush()
        r.job.emit(DoneEvent(r.index, reason, r.generated, tail))
        if r.index == 0 and r.job.on_answer is not None:
            key = r.job.on_answer("".join(r.answer) + tail)
            if key is not None:
                self.directory.add(self._holder(r.slot), self.model_id, (key,))
        self._release(r)

    def _release(self, r: _Running) -> None:
        r.sampler.close()
        r.slot.busy = False
        r.slot.last_used = time.monotonic()
        self._running.remove(r)
        r.job.held -= 1
        if r.job.held == 0:
            r.job.release()

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [j for j in self._pending if j.cancelled]
            if dropped:
                self._pending = deque(j for j in self._pending if not j.cancelled)
        for job in dropped:
            job.release()
        for r in [r for r in self._running if r.job.cancelled]:
            self._release(r)  # its cells still hold a valid prefix, reusable later

    # -- admission -------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    return
                job = self._pending[0]
                free = [s for s in self._slots if not s.busy]
                if len(free) < job.n:
                    return
                self._pending.popleft()
            try:
                self._start(job, free)
            except Exception as exc:  # noqa: BLE001 - reported to the job's client
                logger.exception("could not start a job")
                job.emit(ErrorEvent(str(exc)))
                job.release()

    def _start(self, job: Job, free: list[Slot]) -> None:
        slot, keep = self._best_slot(job.prompt, free)
        source = "slot"
        if job.prompt_logprobs:
            keep = 0
        elif self.prompt_cache is not None:
            entry, n = self.prompt_cache.best(job.prompt, self.model.n_swa)
            n = min(n, len(job.prompt) - 1)
            if entry is not None and n > keep:
                self._save(slot)
                if self.ctx.set_seq_state(slot.seq, entry.state):
                    slot.tokens = list(entry.tokens)
                    keep, source = n, "ram"
                    self.stats.restores += 1
                    self.stats.ram_cached_tokens += n
                    self._on_cache("restore", 1)
                else:
                    slot.tokens.clear()
                    keep = 0
        slots = [slot]
        for _ in range(job.n - 1):
            slots.append(fresh_slot(self._slots, [s for s in free if s not in slots], slots))
        if keep < len(slot.tokens):
            self._save(slot)  # what it holds beyond the kept prefix is about to go
        for other in slots[1:]:
            self._save(other)
        if not self.ctx.seq_rm(slot.seq, keep, -1):
            self.ctx.seq_rm(slot.seq)
            keep = 0
        del slot.tokens[keep:]
        samplers: list[Sampler] = []
        try:
            for i in range(job.n):
                samplers.append(Sampler(self.model, job.sampling, seed_offset=i))
        except BaseException:
            for sampler in samplers:
                sampler.close()
            raise
        self.stats.cached_tokens += keep
        for s in slots:
            self.directory.hold(self._holder(s), self.model_id, job.prefix_keys)
        job.held = job.n
        job.emit(StartEvent(len(job.prompt), keep, source))
        if keep:
            self._on_cache(source, keep)
        for i, (s, sampler) in enumerate(zip(slots, samplers, strict=True)):
            s.busy = True
            s.last_used = time.monotonic()
            self._running.append(
                _Running(
                    job=job,
                    index=i,
                    slot=s,
                    sampler=sampler,
                    text=TextStream(job.stop),
                    prompt_left=list(job.prompt[keep:]) if i == 0 else [],
                    primary=i == 0,
                )
            )

    def _holder(self, slot: Slot) -> tuple[str, str, int]:
        """``slot``'s name in the cache directory."""
        return ("slot", self.model_id, slot.seq)

    def _save(self, slot: Slot) -> None:
        """Copy ``slot``'s state into the RAM cache (if there is one and it is worth it)."""
        cache = self.prompt_cache
        if cache is None or not cache.worth_keeping(slot.tokens):
            return
        state = self.ctx.seq_state(slot.seq)
        evictions = cache.evictions
        entry = CachedPrompt(list(slot.tokens), state, self.ctx.seq_pos_min(slot.seq))
        if not cache.put(entry):
            return
        self.directory.copy(self._holder(slot), ("ram", id(entry)))
        self.stats.saves += 1
        self._on_cache("save", 1)
        if cache.evictions > evictions:
            self._on_cache("evict", cache.evictions - evictions)

    def _best_slot(self, prompt: list[int], free: list[Slot]) -> tuple[Slot, int]:
        """The free slot whose cells share the longest prefix with ``prompt``, and how many
        of its cells can be kept (at least the prompt's last token is always evaluated, to
        get its logits).

        A slot is only taken for its prefix when the prompt continues at least half of what
        it holds (llama.cpp's server's ``--slot-prompt-similarity``): a prompt sharing just
        a template's first tokens with a long conversation takes an empty or the least
        recently used slot instead, and the conversation stays where it is.
        """
        best, best_len = None, 0
        for slot in free:
            n = common_prefix(slot.tokens, prompt)
            if n > best_len and 2 * n >= len(slot.tokens):
                best, best_len = slot, n
        if best is None:
            return fresh_slot(self._slots, free, ()), 0
        keep = min(best_len, len(prompt) - 1)
        n_swa = self.model.n_swa
        if keep > 0 and n_swa > 0 and self.ctx.seq_pos_min(best.seq) > max(0, keep - n_swa):
            keep = 0  # sliding-window layers dropped cells the kept prefix's tail needs
        return best, keep

    # -- failures --------------------------------------------------------------------

    def _fail_batch(
        self, generating: list[_Running], chunks: list[tuple[_Running, list[int]]], status: int
    ) -> None:
        message = f"llama_decode failed (status {status})"
        logger.error(message)
        failed = {id(r.job): r.job for r in generating} | {id(r.job): r.job for r, _ in chunks}
        for job in failed.values():
            job.emit(ErrorEvent(message))
        for r in [r for r in self._running if id(r.job) in failed]:
            self.ctx.seq_rm(r.slot.seq)
            r.slot.tokens.clear()
            self.directory.drop(self._holder(r.slot))
            self._release(r)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        jobs = {id(r.job): r.job for r in self._running}
        for r in list(self._running):
            self._release(r)
        for job in [*jobs.values(), *pending]:
            if not job.cancelled:
                job.emit(ErrorEvent(message))
            job.release()


def _end_slow_sampler(r: _Running, spent: float, *, still_running: bool) -> None:
    """End ``r``'s request: picking one token took ``spent`` seconds (any thread)."""
    grammar = r.sampler.grammar is not None
    logger.warning(
        "picking one token %s %.2fs%s; ending its request",
        "has taken" if still_running else "took",
        spent,
        " (a grammar)" if grammar else "",
    )
    advice = "; simplify the schema" if grammar else ""
    message = f"picking one token took {spent:.2f}s, over the limit{advice}"
    r.job.fail(ErrorEvent(message, 400, "grammar_too_complex" if grammar else "step_stalled"))
