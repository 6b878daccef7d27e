"""The sampler's shortcuts pick what llama.cpp's chain picks over the whole vocabulary.

``Sampler`` answers greedy requests without penalties or a grammar from the logits
(``greedy_token``), and hands the chain only the tokens min-p can keep when sampling with
top-k and min-p, where llama.cpp's chain would copy the whole vocabulary per token. Checked
against a plain biased argmax on rows full of ties, and against llama.cpp's own chain over
the whole vocabulary on the real Gemma 3 270M's logits: the same tokens, draw for draw.
"""

from __future__ import annotations

import numpy as np
import pytest
from llmlb.node.inference.llama_native import Batch, Context, ContextShape, Model, capi
from llmlb.node.inference.sampling import Sampler, SamplingParams, greedy_token

from tests.conftest import assemble_gemma


def _biased_argmax(row: np.ndarray, ids: np.ndarray, values: np.ndarray) -> int:
    biased = row.copy()
    biased[ids] += values
    return int(biased.argmax())


def test_greedy_token_is_the_first_maximum_of_the_biased_logits():
    rng = np.random.default_rng(7)
    biases = np.array([-100.0, -1.0, 0.0, 0.5, 1.0, 2.0, 100.0], np.float32)
    for _ in range(5000):
        row = rng.integers(-4, 4, 40).astype(np.float32)  # small integers: ties everywhere
        count = int(rng.integers(0, 6))
        ids = rng.choice(40, count, replace=False).astype(np.int64)
        values = rng.choice(biases, count)
        assert greedy_token(row, ids, values) == _biased_argmax(row, ids, values)


@pytest.mark.parametrize(
    ("row", "bias", "expected"),
    [
        ([1, 5, 5, 2], {}, 1),  # a tie: the lower id
        ([1, 5, 5, 2], {1: -100.0}, 2),  # the maximum banned: the next one
        ([1, 5, 5, 2], {3: 3.0}, 1),  # a bias that ties the maximum: the lower id wins
        ([1, 5, 4, 2], {0: 4.0}, 0),  # a bias that ties from below the maximum's id
        ([1, 5, 4, 2], {2: 1.5, 3: 3.5}, 2),  # two biased tokens over the maximum
    ],
)
def test_greedy_token_cases(row, bias, expected):
    ids = np.array(list(bias), np.int64)
    values = np.array(list(bias.values()), np.float32)
    assert greedy_token(np.array(row, np.float32), ids, values) == expected


def _chain_token(model: Model, ctx: Context, index: int, bias: dict[int, float]) -> int:
    """llama.cpp's logit-bias + greedy chain on output row ``index``."""
    c = capi()
    chain = c.llama_sampler_chain_init(c.llama_sampler_chain_default_params())
    try:
        if bias:
            entries = (c.llama_logit_bias * len(bias))()
            for i, (token, value) in enumerate(bias.items()):
                entries[i].token, entries[i].bias = token, value
            biased = c.llama_sampler_init_logit_bias(model.n_vocab, len(bias), entries)
            c.llama_sampler_chain_add(chain, biased)
        c.llama_sampler_chain_add(chain, c.llama_sampler_init_greedy())
        return int(c.llama_sampler_sample(chain, ctx.ptr, index))
    finally:
        c.llama_sampler_free(chain)


@pytest.fixture(scope="module")
def gemma_rows():
    """Gemma's logits after four prompts: the context and the output row of each."""
    model = Model(str(assemble_gemma()), gpu=False)
    shape = ContextShape(
        n_ctx=4 * 256, n_seq=4, n_batch=256, n_ubatch=256, n_outputs=64, threads=2,
        threads_batch=2,
    )  # fmt: skip
    ctx = Context(model, shape)
    batch = Batch(256)
    prompts = ["Once upon a time", "The capital of France is", "def add(a, b):", "1, 2, 3,"]
    rows = []
    for seq, prompt in enumerate(prompts):
        tokens = model.tokenize(prompt, add_special=True, parse_special=False)
        for pos, token in enumerate(tokens):
            row_index = batch.add(token, pos, seq, pos == len(tokens) - 1)
        rows.append(row_index)
    assert ctx.decode(batch) == 0
    yield model, ctx, rows
    batch.close()
    ctx.close()
    model.close()


def test_greedy_sampler_agrees_with_llama_cpp_chain_on_real_logits(gemma_rows):
    model, ctx, rows = gemma_rows
    for index in rows:
        first, second = (int(t) for t in np.argsort(ctx.logits(index))[::-1][:2])
        for bias in ({}, {first: -100.0}, {second: 100.0}, {first: -0.5, 2: 3.0}):
            sampler = Sampler(model, SamplingParams(temperature=0.0, logit_bias=bias))
            try:
                assert sampler.sample(ctx, index) == _chain_token(model, ctx, index, bias)
            finally:
                sampler.close()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, seed=11),  # the defaults: top-k 40, min-p 0.05
        SamplingParams(temperature=1.5, top_k=5, min_p=0.2, seed=12),
        SamplingParams(temperature=2.0, top_k=200, min_p=0.01, seed=13),
        SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.5, seed=14),
        SamplingParams(temperature=1.0, presence_penalty=-2.0, repeat_penalty=0.8, seed=15),
        SamplingParams(temperature=0.9, logit_bias={2: 5.0, 1: -100.0, 17: 2.5}, seed=16),
    ],
    ids=["defaults", "narrow", "wide", "penalties", "negative-penalties", "bias"],
)
def test_sampled_draws_match_the_whole_vocabulary_draw_for_draw(gemma_rows, params):
    model, ctx, rows = gemma_rows
    short = Sampler(model, params)
    whole = Sampler(model, params, whole_vocabulary=True)
    try:
        # 300 draws over the four rows: the same seed, the same accepted tokens (penalties)
        drawn = [(short.sample(ctx, i), whole.sample(ctx, i)) for i in rows * 75]
    finally:
        short.close()
        whole.close()
    assert [a for a, _ in drawn] == [b for _, b in drawn]
    assert len({a for a, _ in drawn}) > 1  # draws, not one token over and over
