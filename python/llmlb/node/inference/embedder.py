"""Embeddings from a small context of their own, pooled and L2-normalised.

A generative model (causal attention) is read in chunks of :data:`CHUNK` tokens: each
token's final hidden state depends only on the tokens before it, so chunking changes
nothing, and the context never holds a full-vocabulary logits row for more than
:data:`CHUNK` positions (Gemma's 262k vocabulary makes that 1 MiB a position). A model
that declares its own pooling (an embedding model, possibly bidirectional) is read in one
pass over the whole input, as llama.cpp requires.
"""

from __future__ import annotations

import base64
import threading

import numpy as np

from llmlb.errors import ApiError
from llmlb.node.inference.llama_native import Context, ContextShape, Model

CHUNK = 32

_POOLING = {"mean", "cls", "last"}


class Embedder:
    """Pooled embeddings of one model.

    Args:
        model: the loaded weights (shared with generation).
        n_ctx: the longest input accepted, in tokens.
        threads: CPU threads.
    """

    def __init__(self, model: Model, n_ctx: int, threads: int):
        self.model = model
        self.pooling = self._declared_pooling(model)
        self.n_ctx = min(n_ctx, model.n_ctx_train) if model.n_ctx_train > 0 else n_ctx
        chunk = CHUNK if self.pooling is None else self.n_ctx
        self.ctx = Context(
            model,
            ContextShape(
                n_ctx=self.n_ctx,
                n_seq=1,
                n_batch=chunk,
                n_ubatch=chunk,
                n_outputs=chunk,
                threads=threads,
                threads_batch=threads,
                embeddings=True,
            ),
        )
        self._lock = threading.Lock()

    @staticmethod
    def _declared_pooling(model: Model) -> str | None:
        arch = model.meta("general.architecture") or ""
        value = model.meta(f"{arch}.pooling_type")
        names = {"1": "mean", "2": "cls", "3": "last"}
        pooling = names.get(value or "")
        return pooling if pooling in _POOLING else None

    def tokens(self, item: str | list[int]) -> list[int]:
        """Token ids of one input, checked against the context.

        Raises:
            ApiError: 400 ``context_length_exceeded`` (``param: input``) when too long.
        """
        if isinstance(item, str):
            tokens = self.model.tokenize(item, add_special=True, parse_special=False)
        else:
            tokens = list(item)
            bad = next((t for t in tokens if t >= self.model.n_vocab), None)
            if bad is not None:
                raise ApiError(
                    400, "invalid_request_error", f"token id {bad} is not in the vocabulary",
                    param="input",
                )
        if len(tokens) > self.n_ctx:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"an input has {len(tokens)} tokens; this model embeds at most {self.n_ctx}",
                param="input",
            )
        if not tokens:
            raise ApiError(400, "invalid_request_error", "an input is empty", param="input")
        return tokens

    def embed(self, tokens: list[int]) -> np.ndarray:
        """The pooled, unit-norm embedding of ``tokens`` (float32)."""
        from llmlb.node.inference.llama_native import Batch

        with self._lock:
            ctx = self.ctx
            ctx.seq_rm(0)
            chunk = ctx.shape.n_batch
            batch = Batch(chunk)
            total = np.zeros(self.model.n_embd, dtype=np.float64)
            first = last = None
            try:
                for start in range(0, len(tokens), chunk):
                    batch.clear()
                    part = tokens[start : start + chunk]
                    for j, token in enumerate(part):
                        batch.add(token, start + j, 0, True)
                    if ctx.decode(batch) != 0:
                        raise RuntimeError("llama_decode failed while embedding")
                    rows = np.stack([ctx.embedding(j) for j in range(len(part))])
                    total += rows.sum(axis=0, dtype=np.float64)
                    if first is None:
                        first = rows[0].copy()
                    last = rows[-1].copy()
            finally:
                batch.close()
                ctx.seq_rm(0)
        assert first is not None and last is not None  # tokens is never empty
        if self.pooling == "cls":
            vector = first.astype(np.float64)
        elif self.pooling == "last":
            vector = last.astype(np.float64)
        else:
            vector = total / len(tokens)
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm
        return vector.astype(np.float32)

    def close(self) -> None:
        """Free the context."""
        self.ctx.close()


def encode(vector: np.ndarray, as_base64: bool) -> list[float] | str:
    """The ``embedding`` field: floats, or base64 of little-endian float32."""
    if as_base64:
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float64).tolist()
