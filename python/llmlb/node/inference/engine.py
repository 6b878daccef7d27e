"""The node's serving engine: loaded models, each one llama.cpp context with batched slots.

* A model is loaded on first use (the store's ``prefetch``, then llama.cpp with mmap, every
  layer offloaded when the build supports it), in a thread; at most ``max_loaded`` models
  stay resident and the least recently used idle one is unloaded.
* Each loaded model has one context with ``concurrency`` sequences (slots) and a
  :class:`~llmlb.node.inference.scheduler.Scheduler` batching them (continuous batching, prompt
  reuse, ``n > 1`` by copying the prompt's cells). Requests beyond the slots queue briefly,
  then get 429.
* Embeddings use a small context of their own (:mod:`llmlb.node.inference.embedder`), created on the
  first ``/v1/embeddings`` request and unloaded with the model.
* Chat template: the GGUF's own, else ``chat_template.jinja`` in the model directory, else
  the router manifest's ``chat_template``; without one, chat requests get 400.

Requests arrive typed (:mod:`llmlb.node.inference.contract`, parsed by each API dialect),
are checked against the model once (:mod:`llmlb.node.inference.prompts`) and answered with
typed events or a whole answer, which each dialect renders. They are bounded: a default answer
length, a context check before any byte is sent, and cancellation within one decode step when
the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlb.errors import ApiError
from llmlb.node.inference import tool_calls
from llmlb.node.inference.cache_directory import CacheDirectory, request_origin
from llmlb.node.inference.contract import (
    Answer,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Embeddings,
    Generation,
)
from llmlb.node.inference.embedder import Embedder
from llmlb.node.inference.generation import ChatStream, Run, Tooling
from llmlb.node.inference.grammar_compiler import GrammarCompiler
from llmlb.node.inference.jobs import ErrorEvent, Event, Job, SchedulerLimits
from llmlb.node.inference.llama_native import (
    Context,
    ContextShape,
    Model,
    ModelLoadError,
    gpu_offload_supported,
    usable_cores,
)
from llmlb.node.inference.prompt_cache import PromptCache
from llmlb.node.inference.prompts import ModelPrompts, Prepared
from llmlb.node.inference.scheduler import Scheduler
from llmlb.node.inference.templates import CHAT_TEMPLATE_FILENAME
from llmlb.node.metrics import NodeMetrics
from llmlb.prefix_keys import answer_key

__all__ = ["Engine", "EngineOptions", "gpu_offload_supported"]

logger = logging.getLogger(__name__)

# Prompt tokens one decode may take, and one compute pass (llama.cpp's server defaults).
N_BATCH = 2048
N_UBATCH = 512
# Logits rows one decode step may produce beyond one per slot: scoring a prompt's own tokens
# (completions ``echo`` + ``logprobs``) takes this many at a time (1 MiB each for Gemma).
PROMPT_SCORE_ROWS = 16


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Tuning of the engine.

    Attributes:
        max_loaded: models resident at once.
        concurrency: slots (sequences of one context) per model; the node advertises this.
        queue_timeout_s: how long a request may wait for a slot before 429.
        queue_depth: requests waiting per model beyond which new ones get 429 at once.
        n_ctx: context length of each slot.
        max_tokens: answer length of a request that names none (never beyond the context).
        threads, threads_batch: CPU threads for decoding and prompt batches (0: the cores
            this process may use).
        extra_buffer_types: let ggml use its extra CPU buffer types (AMX, repacked
            weights), as llama.cpp does by default. Turn off for a llama-cpp-python built
            with ``GGML_NATIVE=ON`` on a CPU that reports AMX without the kernel/VM enabling
            it: ggml's AMX kernels crash there with SIGILL.
        limits: time bounds of each model's decode loop (grammar per token, watchdog).
        cache_ram_bytes: host RAM for prompt states evicted from the slots, shared evenly by
            the resident models (0: off).
    """

    max_loaded: int = 2
    concurrency: int = 4
    queue_timeout_s: float = 10.0
    queue_depth: int = 16
    n_ctx: int = 4096
    max_tokens: int = 1024
    threads: int = 0
    threads_batch: int = 0
    extra_buffer_types: bool = True
    limits: SchedulerLimits = SchedulerLimits()
    cache_ram_bytes: int = 1 << 30


@dataclass(eq=False)
class _Loaded:
    """One resident model."""

    model_id: str
    model: Model
    ctx: Context
    scheduler: Scheduler
    prompts: ModelPrompts
    embedder: Embedder | None = None
    embed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requests: int = 0
    closed: bool = False


class Engine:
    """Serve typed requests (:mod:`llmlb.node.inference.contract`) from GGUF models in the
    store.

    Args:
        store: a ``llmlb.model_storage.ModelStorage``.
        metrics: where loads, requests, tokens and batches are counted.
        options: limits and tuning.
        template_lookup: ``model_id -> chat template | None`` from the router's manifest.
    """

    def __init__(
        self,
        store: Any,
        metrics: NodeMetrics,
        options: EngineOptions | None = None,
        template_lookup: Callable[[str], str | None] | None = None,
    ):
        self.store = store
        self.metrics = metrics
        self.options = options or EngineOptions()
        self.template_lookup = template_lookup or (lambda _id: None)
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        self._loading: dict[str, asyncio.Future[_Loaded]] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=self.options.max_loaded + 2, thread_name_prefix="llama"
        )
        self._gpu: bool | None = None
        self.grammars = GrammarCompiler()
        self.directory = CacheDirectory()
        cores = usable_cores()
        self._threads = self.options.threads or cores
        self._threads_batch = self.options.threads_batch or self._threads

    # -- state ------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Ids of resident models, least recently used first."""
        return list(self._models)

    def is_loading(self, model_id: str) -> bool:
        """Whether ``model_id`` is being loaded now."""
        return model_id in self._loading

    def active_requests(self) -> int:
        """Requests holding slots right now, all models together."""
        return sum(m.scheduler.active() for m in self._models.values())

    def queued(self, model_id: str) -> int:
        """Requests waiting for one of ``model_id``'s slots right now."""
        loaded = self._models.get(model_id)
        return loaded.scheduler.waiting() if loaded is not None else 0

    # -- loading ----------------------------------------------------------------------

    def _find_template(self, model_id: str, path: str, model: Model) -> str | None:
        template = model.meta("tokenizer.chat_template")
        if template:
            return template
        for directory in (Path(self.store.model_dir(model_id)), Path(path).parent):
            sidecar = directory / CHAT_TEMPLATE_FILENAME
            if sidecar.is_file():
                return sidecar.read_text()
        return self.template_lookup(model_id)

    def _load_blocking(self, model_id: str, path: str) -> _Loaded:
        started = time.monotonic()
        try:
            self.store.prefetch(model_id)
        except Exception as exc:  # noqa: BLE001 - prefetch is an optimisation
            logger.warning("%s: prefetch failed: %s", model_id, exc)
        if self._gpu is None:
            self._gpu = gpu_offload_supported()
        model = Model(path, gpu=self._gpu, extra_buffer_types=self.options.extra_buffer_types)
        try:
            slots = self.options.concurrency
            n_ctx_seq = self.options.n_ctx
            if model.n_ctx_train > 0:
                n_ctx_seq = min(n_ctx_seq, model.n_ctx_train)
            ctx = Context(
                model,
                ContextShape(
                    n_ctx=n_ctx_seq * slots,
                    n_seq=slots,
                    n_batch=min(N_BATCH, n_ctx_seq * slots),
                    n_ubatch=min(N_UBATCH, n_ctx_seq * slots),
                    n_outputs=max(slots, PROMPT_SCORE_ROWS),
                    threads=self._threads,
                    threads_batch=self._threads_batch,
                ),
            )
        except BaseException:
            model.close()
            raise
        prompts = ModelPrompts(
            model_id,
            model,
            self._find_template(model_id, path, model),
            ctx.n_ctx_seq,
            slots,
            self.grammars,
            self.options.max_tokens,
            str(self.store.model_dir(model_id)),
        )
        scheduler = Scheduler(
            model,
            ctx,
            on_step=self._on_step,
            limits=self.options.limits,
            on_stall=lambda _s: self.metrics.stalled_steps.inc(),
            prompt_cache=PromptCache(self.options.cache_ram_bytes // self.options.max_loaded),
            on_cache=self._on_cache,
            directory=self.directory,
            model_id=model_id,
        )
        elapsed = time.monotonic() - started
        self.metrics.load_seconds.labels("generate").observe(elapsed)
        logger.info(
            "%s: loaded in %.3fs (%s; %d slots of %d tokens)",
            model_id, elapsed, path, slots, ctx.n_ctx_seq,
        )
        return _Loaded(
            model_id=model_id,
            model=model,
            ctx=ctx,
            scheduler=scheduler,
            prompts=prompts,
        )

    def _on_step(self, sequences: int, prompt_tokens: int, generated: int) -> None:
        """Called by a decode loop after each step (from its thread)."""
        self.metrics.decode_batch.observe(sequences)
        if sequences > self.metrics.peak_batch:
            self.metrics.peak_batch = sequences
            self.metrics.decode_batch_peak.set(sequences)
        if generated:
            self.metrics.tokens.labels("completion").inc(generated)
        if prompt_tokens:
            self.metrics.tokens.labels("prompt").inc(prompt_tokens)

    def _on_cache(self, event: str, n: int) -> None:
        """Called by a decode loop as jobs reuse cells and its RAM cache changes."""
        metrics = self.metrics
        if event in ("slot", "ram"):
            metrics.cached_tokens.labels(event).inc(n)
            return
        metrics.prompt_cache_events.labels(event).inc(n)
        caches = [m.scheduler.prompt_cache for m in list(self._models.values())]
        metrics.prompt_cache_bytes.set(sum(c.bytes for c in caches if c is not None))
        metrics.prompt_cache_entries.set(sum(len(c) for c in caches if c is not None))

    async def _ensure_loaded(self, model_id: str, path: str) -> _Loaded:
        loaded = self._models.get(model_id)
        if loaded is not None and not loaded.closed:
            self._models.move_to_end(model_id)
            return loaded
        pending = self._loading.get(model_id)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Loaded] = loop.create_future()
        self._loading[model_id] = future
        try:
            await self._make_room()
            try:
                loaded = await loop.run_in_executor(
                    self._pool, self._load_blocking, model_id, path
                )
            except ModelLoadError as exc:
                raise ApiError(500, "model_load_failed", str(exc)) from None
            self._models[model_id] = loaded
            self.metrics.loaded_models.set(len(self._models))
            future.set_result(loaded)
            return loaded
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            del self._loading[model_id]

    async def _make_room(self) -> None:
        while len(self._models) + len(self._loading) > self.options.max_loaded:
            victim = next((m for m in self._models.values() if m.requests == 0), None)
            if victim is None:
                raise ApiError(
                    503,
                    "node_busy",
                    f"all {self.options.max_loaded} loaded models are busy",
                    retry_after=1,
                )
            await self.unload(victim.model_id)

    async def load(self, model_id: str, path: str) -> None:
        """Load ``model_id`` now (e.g. right after it was downloaded)."""
        await self._ensure_loaded(model_id, path)

    async def unload(self, model_id: str) -> None:
        """Drop ``model_id`` from memory (at once if idle, else when its last request ends)."""
        loaded = self._models.pop(model_id, None)
        self.metrics.loaded_models.set(len(self._models))
        if loaded is None:
            return
        loaded.closed = True
        if loaded.requests == 0:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close, loaded)

    def _close(self, loaded: _Loaded) -> None:
        if not loaded.scheduler.close():
            # its decode thread is still inside llama.cpp: freeing the context under it would
            # crash; the memory is left to the process's exit
            logger.warning("%s: decode loop did not stop; context left allocated", loaded.model_id)
            return
        if loaded.embedder is not None:
            loaded.embedder.close()
        loaded.ctx.close()
        loaded.model.close()
        logger.info("%s: unloaded", loaded.model_id)

    async def close(self) -> None:
        """Unload everything and stop the worker threads."""
        for model_id in list(self._models):
            await self.unload(model_id)
        await self.grammars.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- requests ---------------------------------------------------------------------

    async def chat(
        self, model_id: str, path: str, request: ChatRequest
    ) -> Answer | ChatStream:
        """Run a chat request: the whole :class:`Answer`, or when ``stream`` its typed events.

        Raises:
            ApiError: 400 naming the client's field when the model refuses the request, 429
                when its slots stay busy, 5xx when it cannot be served.
        """
        loaded = await self._ensure_loaded(model_id, path)
        prepared = await loaded.prompts.chat(request)
        return await self._generate(loaded, prepared, request.generation)

    async def count_chat_tokens(self, model_id: str, path: str, request: ChatRequest) -> int:
        """The prompt tokens a chat request renders to (messages, tools, template)."""
        loaded = await self._ensure_loaded(model_id, path)
        return len(loaded.prompts.chat_tokens(request))

    async def complete(
        self, model_id: str, path: str, request: CompletionRequest
    ) -> Answer | ChatStream:
        """Run a completion request (``/v1/completions``): the whole answer or its events."""
        loaded = await self._ensure_loaded(model_id, path)
        prepared = await loaded.prompts.completion(request)
        return await self._generate(loaded, prepared, request.generation)

    async def embed(self, model_id: str, path: str, request: EmbeddingRequest) -> Embeddings:
        """Pooled, unit-norm vectors from the model's embedding context (``/v1/embeddings``)."""
        if request.dimensions is not None:
            raise ApiError(
                400,
                "invalid_request_error",
                "'dimensions' is not supported: this model's embeddings have a fixed size",
                param="dimensions",
            )
        loaded = await self._ensure_loaded(model_id, path)
        loop = asyncio.get_running_loop()
        loaded.requests += 1
        self.metrics.active_requests.inc()
        try:
            async with loaded.embed_lock:
                if loaded.embedder is None:
                    started = time.monotonic()
                    loaded.embedder = await loop.run_in_executor(
                        self._pool,
                        lambda: Embedder(loaded.model, self.options.n_ctx, self._threads),
                    )
                    self.metrics.load_seconds.labels("embed").observe(time.monotonic() - started)
                embedder = loaded.embedder
                token_lists = [embedder.tokens(item) for item in request.inputs]
                vectors = []
                for tokens in token_lists:
                    vectors.append(await loop.run_in_executor(self._pool, embedder.embed, tokens))
        finally:
            self._done(loaded)
            self.metrics.active_requests.dec()
        prompt_tokens = sum(len(t) for t in token_lists)
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        return Embeddings(vectors, prompt_tokens)

    # -- generation -------------------------------------------------------------------

    async def _generate(
        self, loaded: _Loaded, prepared: Prepared, generation: Generation
    ) -> Answer | ChatStream:
        """Queue a checked request's jobs; its answer, or its events when streaming."""
        scheduler = loaded.scheduler
        prompts, tooling = prepared.prompts, prepared.tooling
        # a burst that free slots will take at the next step is not a queue
        if scheduler.waiting() - scheduler.free_slots() >= self.options.queue_depth:
            raise ApiError(
                429,
                "model_overloaded",
                f"model {loaded.model_id!r} has too many queued requests",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        jobs: list[Job] = []
        keys, on_answer = self._prefix(prompts, tooling)
        for number, prompt in enumerate(prompts):

            def emit(event: Event, number: int = number) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                    loop.call_soon_threadsafe(events.put_nowait, (number, event))

            jobs.append(
                Job(
                    prompt=prompt,
                    max_tokens=prepared.max_tokens,
                    sampling=prepared.sampling,
                    emit=emit,
                    n=generation.n,
                    stop=prepared.stop,
                    stop_tokens=loaded.prompts.turn_stop_tokens,
                    top_logprobs=generation.top_logprobs if generation.logprobs else None,
                    prompt_logprobs=bool(prepared.echo) and generation.logprobs,
                    special_tokens=loaded.prompts.marker_tokens if tooling else frozenset(),
                    prefix_keys=keys,
                    on_answer=on_answer,
                )
            )
        run = Run(
            scheduler,
            loaded.model,
            loaded.model_id,
            jobs,
            events,
            generation,
            prepared.echo,
            tooling,
            on_close=lambda: self._done(loaded),
        )
        loaded.requests += 1
        self.metrics.active_requests.inc()  # down again once the scheduler let go of all jobs
        feeder = _Feeder(scheduler, jobs, self.metrics.active_requests.dec)
        try:
            if not feeder.start():
                raise ApiError(503, "model_unloading", "the model is being unloaded",
                               retry_after=1)
            await run.started(self.options.queue_timeout_s)
        except BaseException:
            run.close()
            raise
        if generation.stream:
            return ChatStream(run)
        try:
            return await run.collect()
        finally:
            run.close()

    @staticmethod
    def _prefix(
        prompts: list[list[int]], tooling: Tooling | None
    ) -> tuple[tuple[int, ...], Callable[[str], int | None] | None]:
        """The request's prefix keys and how to key its answer (one prompt only: a request
        of several prompts is not a conversation anyone continues)."""
        origin = request_origin.get()
        if origin is None or len(prompts) != 1:
            return (), None
        route, keys = origin
        if not keys:
            return (), None

        def on_answer(text: str) -> int | None:
            calls: list[tuple[str, str]] = []
            if tooling is not None:
                text, parsed = tool_calls.parse(text, tooling.kind, tooling.names)
                calls = [(c.name, c.arguments) for c in parsed]
            key = answer_key(route, keys, text, calls)
            return key[0] if key is not None else None

        return tuple(k for k, _ in keys), on_answer

    def _done(self, loaded: _Loaded) -> None:
        loaded.requests -= 1
        if loaded.closed and loaded.requests == 0:
            self._pool.submit(self._close, loaded)


class _Feeder:
    """Submits one request's jobs (one per prompt) at most ``scheduler.slots`` at a time,
    so a request with many prompts never fills the model's queue ahead of other clients;
    calls ``then`` once every job is released (finished, failed or cancelled)."""

    def __init__(self, scheduler: Scheduler, jobs: list[Job], then: Callable[[], Any]):
        self._scheduler = scheduler
        self._first = jobs[: scheduler.slots]
        self._later = deque(jobs[scheduler.slots :])
        self._left = len(jobs)
        self._then = then
        self._lock = threading.Lock()
        for job in jobs:
            job.on_release = self._released

    def start(self) -> bool:
        """Submit the first jobs; ``False`` (everything released) if the model is closing."""
        for i, job in enumerate(self._first):
            try:
                self._scheduler.submit(job)
            except RuntimeError:
                for _ in range(len(self._first) - i + len(self._later)):
                    self._tick()
                self._later.clear()
                return False
        return True

    def _released(self) -> None:
        """A job let go of its slots (scheduler thread): count it, submit the next one."""
        self._tick()
        while True:
            with self._lock:
                job = self._later.popleft() if self._later else None
            if job is None:
                return
            if not job.cancelled:
                try:
                    self._scheduler.submit(job)
                    return
                except RuntimeError:
                    job.emit(ErrorEvent("the model was unloaded"))
            self._tick()  # never submitted: released here

    def _tick(self) -> None:
        with self._lock:
            self._left -= 1
            done = self._left == 0
        if done:
            self._then()
