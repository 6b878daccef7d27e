"""Thin, typed glue over llama-cpp-python's low-level API (``llama_cpp``'s ctypes bindings).

Only what the engine needs: loading a model, creating contexts, tokenising and
detokenising, a reusable ``llama_batch``, and views of the logits and embeddings. Every
ctypes call releases the GIL, so the decode loop runs beside the event loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def capi() -> Any:
    """The ``llama_cpp`` module, with llama.cpp's backend initialised once per process."""
    global _backend_ready
    import llama_cpp

    if not _backend_ready:
        with _backend_lock:
            if not _backend_ready:
                from llama_cpp import _logger

                _logger.set_verbose(False)
                llama_cpp.llama_backend_init()
                _backend_ready = True
    return llama_cpp


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU (CUDA, Metal, …)."""
    return bool(capi().llama_supports_gpu_offload())


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ModelLoadError(RuntimeError):
    """llama.cpp refused a model file or could not create a context for it."""


class Model:
    """One loaded GGUF (weights mmapped) and its vocabulary.

    Args:
        path: the GGUF (its first split for a split model).
        gpu: offload every layer (when the build supports it).
        extra_buffer_types: let ggml repack weights into its extra CPU buffer types.
    """

    def __init__(self, path: str, *, gpu: bool, extra_buffer_types: bool = True):
        c = capi()
        params = c.llama_model_default_params()
        params.n_gpu_layers = -1 if gpu else 0
        params.use_mmap = True
        params.use_extra_bufts = extra_buffer_types
        self._c = c
        self.ptr = c.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        self.path = path
        self.vocab = c.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(c.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(c.llama_model_n_embd(self.ptr))
        self.n_ctx_train = int(c.llama_model_n_ctx_train(self.ptr))
        self.n_swa = int(c.llama_model_n_swa(self.ptr))
        self.add_bos = bool(c.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}

    # -- metadata -------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or ``None`` when absent."""
        size = self._c.llama_model_meta_val_str(self.ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        self._c.llama_model_meta_val_str(self.ptr, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def token(self, name: str) -> int:
        """A special token id (``bos``, ``eos``, ``fim_pre``, …), -1 when the model has none."""
        return int(getattr(self._c, f"llama_vocab_{name}")(self.vocab))

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, EOT, …)."""
        return bool(self._c.llama_vocab_is_eog(self.vocab, token))

    # -- text <-> tokens ----------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text``."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (ctypes.c_int32 * capacity)()
        n = self._c.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            tokens = (ctypes.c_int32 * capacity)()
            n = self._c.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        return list(tokens[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes ``token`` stands for (``special``: control tokens as their text)."""
        cache = self._special_pieces if special else self._pieces
        cached = cache.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = self._c.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._c.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        value = buf.raw[:n]
        cache[token] = value
        return value

    def close(self) -> None:
        """Free the weights (no context of this model may be used afterwards)."""
        if self.ptr:
            self._c.llama_model_free(self.ptr)
            self.ptr = None


@dataclass(frozen=True, slots=True)
class ContextShape:
    """How a context is sized.

    Attributes:
        n_ctx: total KV cells (all sequences together).
        n_seq: sequences (slots) sharing the context.
        n_batch: tokens one ``llama_decode`` may take.
        n_ubatch: tokens one compute pass takes.
        n_outputs: most logits/embedding rows one ubatch produces (bounds the output
            buffer: one row is a full vocabulary of floats).
        threads, threads_batch: CPU threads for decoding and for prompt batches.
        embeddings: extract embeddings (per token, not pooled).
    """

    n_ctx: int
    n_seq: int
    n_batch: int
    n_ubatch: int
    n_outputs: int
    threads: int
    threads_batch: int
    embeddings: bool = False


class Context:
    """A llama.cpp context over a :class:`Model`: KV cache, compute buffers, outputs."""

    def __init__(self, model: Model, shape: ContextShape):
        c = capi()
        params = c.llama_context_default_params()
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_ubatch
        params.n_seq_max = shape.n_seq
        params.n_outputs_max = shape.n_outputs
        params.n_threads = shape.threads
        params.n_threads_batch = shape.threads_batch
        params.embeddings = shape.embeddings
        params.pooling_type = c.LLAMA_POOLING_TYPE_NONE
        params.swa_full = False  # sliding-window layers keep only their window
        params.kv_unified = False  # one KV stream per sequence
        params.no_perf = True
        self._c = c
        self.model = model
        self.shape = shape
        self.ptr = c.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not create a context for {model.path}")
        self.memory = c.llama_get_memory(self.ptr)
        self.n_ctx_seq = int(c.llama_n_ctx_seq(self.ptr))

    def decode(self, batch: Batch) -> int:
        """Run ``batch`` through the model; llama.cpp's status (0 is success)."""
        return int(self._c.llama_decode(self.ptr, batch.raw))

    def logits(self, index: int) -> np.ndarray:
        """The logits of output row ``index`` of the last decode (a view, valid until the next)."""
        ptr = self._c.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def embedding(self, index: int) -> np.ndarray:
        """The embedding of output row ``index`` of the last decode (a view)."""
        ptr = self._c.llama_get_embeddings_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,))

    # -- KV cells of a sequence ----------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Drop ``seq``'s cells in ``[p0, p1)`` (-1: open end); ``False`` if not possible."""
        return bool(self._c.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int) -> None:
        """Make ``dst``'s cells a copy of ``src``'s."""
        self._c.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_pos_min(self, seq: int) -> int:
        """The smallest position ``seq`` still holds, -1 when empty."""
        return int(self._c.llama_memory_seq_pos_min(self.memory, seq))

    def seq_state(self, seq: int) -> np.ndarray:
        """A copy of ``seq``'s state (its KV cells), restorable with :meth:`set_seq_state`."""
        c = self._c
        size = int(c.llama_state_seq_get_size(self.ptr, seq))
        data = np.empty(size, dtype=np.uint8)
        written = int(
            c.llama_state_seq_get_data(
                self.ptr, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq
            )
        )
        return data[:written]

    def set_seq_state(self, seq: int, state: np.ndarray) -> bool:
        """Replace ``seq``'s cells by a state :meth:`seq_state` copied; ``False`` on failure
        (the sequence is then empty)."""
        c = self._c
        pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if int(c.llama_state_seq_set_data(self.ptr, pointer, state.size, seq)) > 0:
            return True
        self.seq_rm(seq)
        return False

    def close(self) -> None:
        """Free the context."""
        if self.ptr:
            self._c.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int):
        c = capi()
        self._c = c
        self.capacity = capacity
        self.raw = c.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        """Empty the batch."""
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, output: bool) -> int:
        """Append one token; its row index (for :meth:`Context.logits` when ``output``)."""
        i = self.n
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = output
        self.n = i + 1
        raw.n_tokens = self.n
        return i

    def close(self) -> None:
        """Free the batch."""
        if self.raw is not None:
            self._c.llama_batch_free(self.raw)
            self.raw = None
