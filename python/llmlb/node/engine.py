"""llama.cpp serving: an LRU of loaded models, per-model slots, token-by-token streaming.

* A model is loaded on first use (the store's ``prefetch`` first, then ``llama_cpp.Llama``
  with mmap, all layers offloaded when the build supports GPU offload), in a thread; at
  most ``max_loaded`` models stay resident and the least recently used idle one is unloaded.
* Each model has ``concurrency`` slots. A slot owns one ``Llama`` context (they share the
  mmapped weights), created on demand; excess requests queue briefly, then get 429.
* Embeddings need a context created with ``embedding=True``: each model gets one extra
  embedding-mode context, loaded lazily on its first ``/v1/embeddings`` request (mean
  pooling when the GGUF names none) and unloaded together with the model.
* Chat template: the GGUF's own, else ``chat_template.jinja`` in the model directory, else
  the router manifest's ``chat_template``; without one, chat requests get 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from llmlb.errors import ApiError
from llmlb.node.metrics import NodeMetrics
from llmlb.node.templates import CHAT_TEMPLATE_FILENAME

logger = logging.getLogger(__name__)

# Request fields passed through to llama-cpp-python (anything else is ignored).
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "logit_bias",
)
_construct_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Tuning of the engine.

    Attributes:
        max_loaded: models resident at once.
        concurrency: slots (parallel requests) per model; the node advertises this.
        queue_timeout_s: how long a request may wait for a slot before 429.
        queue_depth: requests waiting per model beyond which new ones get 429 at once.
        n_ctx: context length of each generation context.
        extra_buffer_types: let ggml use its extra CPU buffer types (AMX, repacked
            weights), as llama.cpp does by default. Turn off for a llama-cpp-python built
            with ``GGML_NATIVE=ON`` on a CPU that reports AMX without the kernel/VM enabling
            it: ggml's AMX kernels crash there with SIGILL.
    """

    max_loaded: int = 2
    concurrency: int = 1
    queue_timeout_s: float = 10.0
    queue_depth: int = 16
    n_ctx: int = 4096
    extra_buffer_types: bool = True


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU (CUDA, Metal, …)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@contextlib.contextmanager
def _model_params(extra_buffer_types: bool) -> Iterator[None]:
    """Apply model parameters ``llama_cpp.Llama`` has no argument for, during construction."""
    import llama_cpp.llama_cpp as capi

    with _construct_lock:
        original = capi.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = extra_buffer_types
            return p

        capi.llama_model_default_params = params
        try:
            yield
        finally:
            capi.llama_model_default_params = original


def _chat_handler(template: str, llm: Any) -> Any:
    """A llama-cpp-python chat handler rendering ``template`` with jinja2."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = llm._model  # noqa: SLF001 - the only way to read special token texts
    eos = vocab.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else ""
    bos = vocab.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""

    return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos).to_chat_handler()


@dataclass
class _Model:
    """One resident model: its contexts, slots and bookkeeping."""

    model_id: str
    path: str
    template: str | None
    concurrency: int
    idle: list[Any] = field(default_factory=list)
    contexts: int = 0
    embedder: Any = None
    embed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: int = 0
    waiting: int = 0
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.concurrency)

    def all_contexts(self) -> list[Any]:
        return [*self.idle, *([self.embedder] if self.embedder is not None else [])]


class Engine:
    """Serve OpenAI-shaped requests from GGUF models in the store.

    Args:
        store: a ``llmlb.model_storage.ModelStorage``.
        metrics: where loads, requests and tokens are counted.
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
        self._models: OrderedDict[str, _Model] = OrderedDict()
        self._loading: dict[str, asyncio.Future[_Model]] = {}
        workers = self.options.max_loaded * (self.options.concurrency + 1) + 2
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llama")
        self._gpu: bool | None = None

    # -- state ------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Ids of resident models, least recently used first."""
        return list(self._models)

    def is_loading(self, model_id: str) -> bool:
        """Whether ``model_id`` is being loaded now."""
        return model_id in self._loading

    def active_requests(self) -> int:
        """Requests holding a slot right now, all models together."""
        return sum(m.active for m in self._models.values())

    def queued(self, model_id: str) -> int:
        """Requests waiting for one of ``model_id``'s slots right now."""
        model = self._models.get(model_id)
        return model.waiting if model is not None else 0

    # -- loading ----------------------------------------------------------------------

    def _llama(self, path: str, *, embedding: bool, n_ctx: int) -> Any:
        import llama_cpp

        if self._gpu is None:
            self._gpu = gpu_offload_supported()
        kwargs: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_gpu_layers": -1 if self._gpu else 0,
            "use_mmap": True,
            "verbose": False,
        }
        if embedding:
            kwargs.update(
                embedding=True,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            )
        with _model_params(self.options.extra_buffer_types):
            return llama_cpp.Llama(path, **kwargs)

    def _find_template(self, model_id: str, path: str, llm: Any) -> str | None:
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            return template
        for directory in (Path(self.store.model_dir(model_id)), Path(path).parent):
            sidecar = directory / CHAT_TEMPLATE_FILENAME
            if sidecar.is_file():
                return sidecar.read_text()
        return self.template_lookup(model_id)

    def _new_context(self, model: _Model) -> Any:
        llm = self._llama(model.path, embedding=False, n_ctx=self.options.n_ctx)
        if model.template:
            llm.chat_handler = _chat_handler(model.template, llm)
        return llm

    def _load_blocking(self, model_id: str, path: str) -> _Model:
        started = time.monotonic()
        try:
            self.store.prefetch(model_id)
        except Exception as exc:  # noqa: BLE001 - prefetch is an optimisation
            logger.warning("%s: prefetch failed: %s", model_id, exc)
        llm = self._llama(path, embedding=False, n_ctx=self.options.n_ctx)
        template = self._find_template(model_id, path, llm)
        model = _Model(model_id, path, template, self.options.concurrency)
        if template:
            llm.chat_handler = _chat_handler(template, llm)
        model.idle.append(llm)
        model.contexts = 1
        elapsed = time.monotonic() - started
        self.metrics.load_seconds.labels("generate").observe(elapsed)
        logger.info("%s: loaded in %.3fs (%s)", model_id, elapsed, path)
        return model

    async def _ensure_loaded(self, model_id: str, path: str) -> _Model:
        model = self._models.get(model_id)
        if model is not None and not model.closed:
            self._models.move_to_end(model_id)
            return model
        pending = self._loading.get(model_id)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Model] = loop.create_future()
        self._loading[model_id] = future
        try:
            await self._make_room()
            model = await loop.run_in_executor(self._pool, self._load_blocking, model_id, path)
            self._models[model_id] = model
            self.metrics.loaded_models.set(len(self._models))
            future.set_result(model)
            return model
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved
            raise
        finally:
            del self._loading[model_id]

    async def _make_room(self) -> None:
        while len(self._models) + len(self._loading) > self.options.max_loaded:
            victim = next(
                (m for m in self._models.values() if m.active == 0 and m.waiting == 0), None
            )
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
        model = self._models.pop(model_id, None)
        self.metrics.loaded_models.set(len(self._models))
        if model is None:
            return
        model.closed = True
        if model.active == 0:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._close, model)

    def _close(self, model: _Model) -> None:
        contexts, model.idle, model.embedder = model.all_contexts(), [], None
        for llm in contexts:
            with contextlib.suppress(Exception):
                llm.close()
        logger.info("%s: unloaded", model.model_id)

    async def close(self) -> None:
        """Unload everything and stop the worker threads."""
        for model_id in list(self._models):
            await self.unload(model_id)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- slots ------------------------------------------------------------------------

    async def _acquire(self, model: _Model) -> None:
        if model.waiting >= self.options.queue_depth and model.slots.locked():
            raise ApiError(
                429,
                "model_overloaded",
                f"model {model.model_id!r} has too many queued requests",
                retry_after=1,
            )
        model.waiting += 1
        try:
            await asyncio.wait_for(model.slots.acquire(), self.options.queue_timeout_s)
        except TimeoutError:
            raise ApiError(
                429,
                "model_overloaded",
                f"all {model.concurrency} slots of model {model.model_id!r} are busy",
                retry_after=1,
            ) from None
        finally:
            model.waiting -= 1
        model.active += 1
        model.last_used = time.monotonic()
        self.metrics.active_requests.inc()

    def _release(self, model: _Model, context: Any = None, embed: bool = False) -> None:
        if context is not None and not embed:
            model.idle.append(context)
        model.active -= 1
        model.slots.release()
        self.metrics.active_requests.dec()
        if model.closed and model.active == 0:
            self._pool.submit(self._close, model)

    async def _context(self, model: _Model) -> Any:
        if model.idle:
            return model.idle.pop()
        model.contexts += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._new_context, model
            )
        except BaseException:
            model.contexts -= 1
            raise

    # -- requests ---------------------------------------------------------------------

    async def chat(self, model_id: str, path: str, body: dict) -> dict | AsyncIterator[bytes]:
        """``/v1/chat/completions``: a response dict, or SSE bytes when ``stream``."""
        messages = _messages(body)
        model = await self._ensure_loaded(model_id, path)
        if not model.template:
            raise ApiError(
                400,
                "chat_template_missing",
                f"model {model_id!r} has no chat template (none in the GGUF, no "
                f"{CHAT_TEMPLATE_FILENAME}, none in the manifest); use "
                "/v1/completions",
            )
        params = _sampling(body)
        params["messages"] = messages
        params["max_tokens"] = _max_tokens(body, None)
        return await self._run(model, "chat", "create_chat_completion", params, body)

    async def complete(self, model_id: str, path: str, body: dict) -> dict | AsyncIterator[bytes]:
        """``/v1/completions``: a response dict, or SSE bytes when ``stream``."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "invalid_request_error", "'prompt' must be a string")
        model = await self._ensure_loaded(model_id, path)
        params = _sampling(body)
        params["prompt"] = prompt
        params["max_tokens"] = _max_tokens(body, 16)
        if body.get("echo"):
            params["echo"] = True
        return await self._run(model, "completions", "create_completion", params, body)

    async def embed(self, model_id: str, path: str, body: dict) -> dict:
        """``/v1/embeddings`` with a lazily loaded embedding-mode context."""
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not (isinstance(inputs, list) and inputs and all(isinstance(s, str) for s in inputs)):
            raise ApiError(
                400,
                "invalid_request_error",
                "'input' must be a string or a non-empty list of strings",
            )
        model = await self._ensure_loaded(model_id, path)
        await self._acquire(model)
        loop = asyncio.get_running_loop()
        try:
            async with model.embed_lock:
                if model.embedder is None:
                    started = time.monotonic()
                    model.embedder = await loop.run_in_executor(
                        self._pool, lambda: self._llama(path, embedding=True, n_ctx=2048)
                    )
                    self.metrics.load_seconds.labels("embed").observe(time.monotonic() - started)
                embedder = model.embedder
                result = await loop.run_in_executor(self._pool, embedder.create_embedding, inputs)
        except ValueError as exc:
            raise ApiError(400, "invalid_request_error", str(exc)) from None
        finally:
            self._release(model, embed=True)
        result["model"] = model_id
        self.metrics.tokens.labels("prompt").inc(result.get("usage", {}).get("prompt_tokens", 0))
        return result

    async def _run(
        self, model: _Model, route: str, method: str, params: dict, body: dict
    ) -> dict | AsyncIterator[bytes]:
        await self._acquire(model)
        try:
            context = await self._context(model)
        except BaseException:
            self._release(model)
            raise
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream(model, context, method, params, include_usage)
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: getattr(context, method)(**params)
            )
        except ValueError as exc:  # e.g. prompt longer than the context
            raise ApiError(400, "invalid_request_error", str(exc)) from None
        finally:
            self._release(model, context)
        result["model"] = model.model_id
        usage = result.get("usage") or {}
        self.metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
        self.metrics.tokens.labels("completion").inc(usage.get("completion_tokens", 0))
        return result

    def _stream(
        self, model: _Model, context: Any, method: str, params: dict, include_usage: bool
    ) -> AsyncIterator[bytes]:
        """Run a streaming generation in a thread; yield SSE events as tokens arrive."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        counts = {"completion": 0, "prompt": 0}

        def put(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                chunks = getattr(context, method)(stream=True, **params)
                for chunk in chunks:
                    if stop.is_set():
                        chunks.close()
                        break
                    counts["completion"] += 1
                    put(("chunk", chunk))
                counts["prompt"] = max(0, int(context.n_tokens) - counts["completion"])
                put(("end", None))
            except BaseException as exc:  # noqa: BLE001 - reported to the client
                put(("error", exc))

        future = loop.run_in_executor(self._pool, produce)
        future.add_done_callback(lambda _f: self._release(model, context))

        async def events() -> AsyncIterator[bytes]:
            last: dict | None = None
            try:
                while True:
                    kind, item = await queue.get()
                    if kind == "chunk":
                        item["model"] = model.model_id
                        last = item
                        yield b"data: " + orjson.dumps(item) + b"\n\n"
                    elif kind == "error":
                        err = {
                            "error": {
                                "message": str(item),
                                "type": "server_error",
                                "code": "inference_failed",
                            }
                        }
                        yield b"data: " + orjson.dumps(err) + b"\n\n"
                        break
                    else:
                        if include_usage and last is not None:
                            usage = {
                                "prompt_tokens": counts["prompt"],
                                "completion_tokens": counts["completion"],
                                "total_tokens": counts["prompt"] + counts["completion"],
                            }
                            final = {**last, "choices": [], "usage": usage}
                            yield b"data: " + orjson.dumps(final) + b"\n\n"
                        yield b"data: [DONE]\n\n"
                        break
            finally:
                stop.set()
                self.metrics.tokens.labels("completion").inc(counts["completion"])
                self.metrics.tokens.labels("prompt").inc(counts["prompt"])

        return events()


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "invalid_request_error", "'messages' must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "invalid_request_error", "each message needs a string 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and p.get("type") == "text"
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, "invalid_request_error", "message 'content' must be text")
        out.append({**message, "content": content})
    return out


def _sampling(body: dict) -> dict:
    return {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}


def _max_tokens(body: dict, default: int | None) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens", default))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, "invalid_request_error", "'max_tokens' must be a positive integer")
    return value
