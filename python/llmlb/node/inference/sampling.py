"""Per-sequence samplers: llama.cpp's sampler chain, an optional grammar, logprobs.

The chain is llama.cpp's own (``llama_sampler_chain_*``): logit bias, penalties, top-k,
top-p, min-p, temperature, then a seeded draw (or greedy at temperature 0). A grammar
(JSON mode, JSON schema, tool calls) is applied the way llama.cpp's server does it: the
chain proposes a token, the grammar checks that one token, and only when it is rejected is
the grammar applied to the whole vocabulary before drawing again. That keeps constrained
decoding close to unconstrained speed.

Handed the whole vocabulary, the chain copies it (262,144 entries for Gemma 3) into a
candidate array and sorts out its top-k for every token: 0.7 ms a token on this project's
2-core machine, and one decoding step samples once per sequence. Two cases avoid it with
the same result:

* greedy without penalties or a grammar: the token is the first maximum of the logits with
  the logit bias added (:func:`greedy_token`), what the chain's logit-bias and greedy
  samplers pick, read from llama.cpp's output row in place (0.065 ms);
* sampling with top-k and min-p and without top-p or a grammar: the chain gets only the
  tokens that can survive its min-p cut (and every biased or penalised token), which hold
  the same top-k, min-p cut, order and draw as the whole vocabulary would
  (:meth:`Sampler._candidates`).
"""

from __future__ import annotations

import ctypes
import math
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from llmlb.node.inference.llama_native import Context, Model, capi

# Penalties look back this many tokens (llama.cpp's server default).
PENALTY_LAST_N = 64

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarError(ValueError):
    """llama.cpp could not compile a grammar."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence picks its next token.

    Attributes:
        temperature: 0 is greedy.
        top_p, top_k, min_p: nucleus, top-k (0: off) and min-p (0: off) filters.
        presence_penalty, frequency_penalty, repeat_penalty: llama.cpp's penalties.
        seed: the draw's seed (``None``: random).
        logit_bias: token id -> bias added to its logit.
        grammar: a GBNF grammar the output must match (``None``: free text).
        given: the names of the fields above the request set itself (the others are
            defaults, which a model's stored defaults may replace).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    given: frozenset[str] = frozenset()


class Sampler:
    """The sampler state of one sequence (free it with :meth:`close`).

    Args:
        model: the model whose logits it samples.
        params: how.
        seed_offset: added to the seed (the choices of one request draw apart).
        whole_vocabulary: always hand llama.cpp's chain the whole vocabulary (the reference
            the shortcuts are tested against).
    """

    def __init__(
        self,
        model: Model,
        params: SamplingParams,
        seed_offset: int = 0,
        *,
        whole_vocabulary: bool = False,
    ):
        c = capi()
        self._c = c
        self._model = model
        self.chain = c.llama_sampler_chain_init(c.llama_sampler_chain_default_params())
        self.grammar = None
        penalised = bool(
            params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0
        )
        free = params.grammar is None and not whole_vocabulary
        # Greedy without penalties: picked from the logits, not by the chain.
        self._greedy = free and params.temperature <= 0 and not penalised
        # Top-k and min-p without top-p: the chain sees only the tokens min-p can keep.
        self._filtered = (
            free
            and params.temperature > 0
            and params.top_k > 0
            and params.top_p >= 1.0
            and params.min_p > 0
        )
        self._log_min_p = math.log(params.min_p) if params.min_p > 0 else 0.0
        # The tokens the penalties sampler counts (its window of accepted tokens).
        self._recent: deque[int] | None = deque(maxlen=PENALTY_LAST_N) if penalised else None
        self._bias_ids = np.fromiter(params.logit_bias.keys(), np.int64, len(params.logit_bias))
        self._bias_values = np.fromiter(
            params.logit_bias.values(), np.float32, len(params.logit_bias)
        )
        add = lambda s: c.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if params.logit_bias:
            biases = (c.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias.items()):
                biases[i].token = token
                biases[i].bias = bias
            add(c.llama_sampler_init_logit_bias(model.n_vocab, len(params.logit_bias), biases))
        if params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0:
            add(
                c.llama_sampler_init_penalties(
                    model.n_vocab,  # this llama.cpp's signature still takes the vocab size
                    PENALTY_LAST_N,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        if params.temperature <= 0:
            add(c.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(c.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(c.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(c.llama_sampler_init_min_p(params.min_p, 1))
            add(c.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else random.getrandbits(31)
            add(c.llama_sampler_init_dist((seed + seed_offset) & 0xFFFFFFFF))
        if params.grammar is not None:
            self.grammar = c.llama_sampler_init_grammar(
                model.vocab, params.grammar.encode(), b"root"
            )
            if not self.grammar:
                self.close()
                raise GrammarError("the grammar could not be compiled")

    def sample(self, ctx: Context, index: int) -> int:
        """Pick the next token from output row ``index`` and record it as accepted."""
        if self._greedy:
            return greedy_token(ctx.logits(index), self._bias_ids, self._bias_values)
        c = self._c
        if self._filtered:
            logits = ctx.logits(index)
            token = self._draw(logits, with_grammar=False, ids=self._candidates(logits))
            c.llama_sampler_accept(self.chain, token)
            if self._recent is not None:
                self._recent.append(token)
            return token
        if self.grammar is None:
            return int(c.llama_sampler_sample(self.chain, ctx.ptr, index))
        logits = ctx.logits(index)
        token = self._draw(logits, with_grammar=False)
        if not self._grammar_allows(token):
            token = self._draw(logits, with_grammar=True)
        c.llama_sampler_accept(self.chain, token)
        c.llama_sampler_accept(self.grammar, token)
        return token

    def _candidates(self, logits: np.ndarray) -> np.ndarray:
        """The token ids the chain must see to draw as from the whole vocabulary: every
        biased or penalised token, and every untouched one whose logit is at most
        -log(min_p) under the highest untouched logit.

        The chain cuts at its highest logit after bias and penalties plus log(min_p). The
        untouched tokens' logits do not change, so their highest is a lower bound of the
        chain's: an untouched token under the floor it gives survives no min-p cut, and a
        token it outranks in the top-k is under that floor too.
        """
        changed = self._bias_ids
        if self._recent:
            changed = np.union1d(changed, np.fromiter(self._recent, np.int64, len(self._recent)))
        best = int(logits.argmax())
        if changed.size and (changed == best).any():
            rest = logits.copy()
            rest[changed] = -np.inf
            peak = float(rest.max())
        else:
            peak = float(logits[best])
        # A hair under the floor: float32 rounding must not drop a token the chain keeps.
        ids = np.flatnonzero(logits >= peak + self._log_min_p - 1e-3)
        return np.union1d(ids, changed) if changed.size else ids

    def _draw(
        self, logits: np.ndarray, *, with_grammar: bool, ids: np.ndarray | None = None
    ) -> int:
        """Apply the chain (after the grammar, ``with_grammar``) to ``ids`` (ascending; all
        tokens when ``None``) and return the token it selects."""
        c = self._c
        if ids is None:
            data = np.empty(logits.shape[0], dtype=_TOKEN_DATA)
            data["id"] = np.arange(logits.shape[0], dtype=np.int32)
            data["logit"] = logits
        else:
            data = np.empty(ids.shape[0], dtype=_TOKEN_DATA)
            data["id"] = ids
            data["logit"] = logits[ids]
        data["p"] = 0.0
        array = c.llama_token_data_array(
            data.ctypes.data_as(c.llama_token_data_p), data.shape[0], -1, False
        )
        if with_grammar:
            c.llama_sampler_apply(self.grammar, ctypes.byref(array))
        c.llama_sampler_apply(self.chain, ctypes.byref(array))
        if array.selected < 0:  # a chain without a final draw cannot happen; be safe
            return int(data["id"][int(np.argmax(data["logit"][: array.size]))])
        return int(array.data[array.selected].id)

    def _grammar_allows(self, token: int) -> bool:
        c = self._c
        one = (c.llama_token_data * 1)()
        one[0].id, one[0].logit, one[0].p = token, 1.0, 0.0
        array = c.llama_token_data_array(one, 1, -1, False)
        c.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return math.isfinite(array.data[0].logit)

    def close(self) -> None:
        """Free the chain and the grammar."""
        if self.chain:
            self._c.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar:
            self._c.llama_sampler_free(self.grammar)
            self.grammar = None


def greedy_token(logits: np.ndarray, bias_ids: np.ndarray, bias_values: np.ndarray) -> int:
    """The first maximum of ``logits`` with ``bias_values`` added at ``bias_ids`` (unique
    ids), as llama.cpp's logit-bias then greedy samplers pick it, without copying the row
    unless a biased token holds its maximum."""
    best = int(logits.argmax())
    if not bias_ids.size:
        return best
    if (bias_ids == best).any():  # a biased token holds the maximum: bias a copy
        row = logits.copy()
        row[bias_ids] += bias_values
        return int(row.argmax())
    biased = logits[bias_ids] + bias_values
    top = biased.max()
    peak = logits[best]
    if top < peak:
        return best
    # Ties go to the lowest id, as a first-maximum scan finds them.
    winner = int(bias_ids[biased == top].min())
    return best if top == peak and best < winner else winner


def logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under ``logits`` and the ``top`` most likely tokens.

    Raw model probabilities (softmax of the logits, before any sampler), as OpenAI reports.
    """
    values = logits.astype(np.float64, copy=False)
    peak = float(values.max())
    log_norm = peak + math.log(float(np.exp(values - peak).sum()))
    chosen = float(values[token]) - log_norm
    if top <= 0:
        return chosen, []
    best = np.argpartition(values, -top)[-top:]
    best = best[np.argsort(values[best])[::-1]]
    return chosen, [(int(t), float(values[t]) - log_norm) for t in best]
