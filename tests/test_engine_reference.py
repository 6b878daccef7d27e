"""The engine against an independent reference: llama-cpp-python's high-level ``Llama``.

Every other engine test compares the engine with itself (batched with solo, echo with
continuation). Here the same GGUF runs in ``llama_cpp.Llama`` with the engine's context
settings (context length, batch sizes, threads, flash attention, sliding-window cache, GPU
offload), and greedy answers are compared token by token:

* one request alone (in a freshly loaded model: a prompt evaluated after a reused prefix
  is split into other row groups, which moves logits as much as batching does): the same
  tokens, and logprobs (the chosen token's and the
  alternatives') within ``SOLO_TOLERANCE``;
* eight requests decoded in one batch: ggml multiplies 8 rows with other kernels than 1 row
  (the repacked Q4_K GEMM instead of the GEMV), so logits move by up to ``BATCH_NOISE`` and
  a near-tied greedy choice may flip. Where a batched answer leaves the reference, it must be
  at a near tie: the batched top-2 logprobs within ``NEAR_TIE`` and the reference's token the
  batched runner-up; before that, every chosen logprob within ``BATCH_NOISE``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest
from llmlb.model_storage import ModelStorage
from llmlb.node.api import openai_response as openai_api
from llmlb.node.inference.engine import Engine, EngineOptions
from llmlb.node.inference.llama_native import gpu_offload_supported, usable_cores
from llmlb.node.metrics import NodeMetrics

from tests.node_fixtures import place_model

MODEL = "local/reference"
N_CTX = 512  # per slot, and the reference's whole context
SLOTS = 8
N_TOKENS = 16
TOP = 5
# Measured on this CPU build: the solo engine and Llama agree to 3.4e-7 in every logprob
# (5 prompts x 24 tokens; the same kernels on the same shapes, float32 against float64
# log-softmax). 1e-3 leaves room for other backends and still catches any real difference:
# a wrong position, a missing BOS, a penalty or temperature applied before the logprobs all
# move them by more than 1e-2.
SOLO_TOLERANCE = 1e-3
# Measured over 48 batched answers of 32 tokens (3 rounds of 16 prompts, 8 at a time): the
# chosen tokens' logprobs moved by at most 0.23 from the solo reference, and every first
# divergence was at a top-2 gap of 0.03-0.19 with the reference's token as the runner-up.
# A gap below 0.5 holds at 16% of the reference's positions, so a divergence anywhere else
# (a mixed-up sequence, a wrong position) is caught 5 times out of 6 per answer.
BATCH_NOISE = 0.5
NEAR_TIE = 0.5

PROMPTS = [
    "Paris is the capital of",
    "The three primary colours are",
    "Once upon a time there was",
    "def fibonacci(n):",
    "The boiling point of water is",
    "My favourite fruit is",
    "In 1969, astronauts",
    "The quick brown fox",
]


@dataclass(frozen=True)
class Reference:
    """Llama's greedy answer to one prompt: token ids, their text, and per position the
    logprob of the chosen token and of the ``2 * TOP`` most likely ones (by text)."""

    prompt_ids: list[int]
    ids: list[int]
    pieces: list[str]
    chosen: list[float]
    top: list[dict[str, float]]
    stopped: bool  # ended by an end-of-generation token before N_TOKENS


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    peak = values.max()
    return values - (peak + np.log(np.exp(values - peak).sum()))


def _reference(llm, prompt: str) -> Reference:
    """Greedy decoding of ``prompt`` with ``Llama.generate`` (temperature 0, no penalties)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    llm.reset()  # no prefix kept from the previous prompt
    ids, pieces, chosen, top = [], [], [], []
    stopped = False
    for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            stopped = True
            break
        # the logits that chose this token: the last row evaluated (logits_all keeps them)
        logprobs = _log_softmax(llm.scores[llm.n_tokens - 1])
        best = np.argsort(logprobs)[::-1][: 2 * TOP]
        ids.append(token)
        pieces.append(_piece(llm, token))
        chosen.append(float(logprobs[token]))
        top.append({_piece(llm, int(t)): float(logprobs[t]) for t in best[::-1]})
        if len(ids) == N_TOKENS:
            break
    return Reference(prompt_ids, ids, pieces, chosen, top, stopped)


def _piece(llm, token: int) -> str:
    return llm.detokenize([token]).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gemma_gguf):
    """The engine (8 slots of ``N_CTX`` tokens) over the Gemma GGUF, and Llama's greedy
    answers to every prompt from the same file with the same context settings."""
    import llama_cpp

    root = tmp_path_factory.mktemp("reference-store")
    place_model(root, MODEL, gemma_gguf)
    storage = ModelStorage(root)
    path = str(storage.resolve(MODEL).primary_path)
    threads = usable_cores()
    llm = llama_cpp.Llama(
        path,
        n_ctx=N_CTX,
        n_batch=512,  # the engine's n_ubatch; every prompt here is one batch on both sides
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=-1 if gpu_offload_supported() else 0,  # the engine offloads every layer
        flash_attn=True,  # the engine leaves llama.cpp's "auto", which enables it
        swa_full=False,  # the engine keeps only the sliding window
        logits_all=True,  # keep every row's logits, for the logprobs
        verbose=False,
    )
    try:
        references = {p: _reference(llm, p) for p in PROMPTS}
    finally:
        llm.close()
    metrics = NodeMetrics()
    engine = Engine(storage, metrics, EngineOptions(n_ctx=N_CTX, concurrency=SLOTS))
    loop = asyncio.new_event_loop()
    yield {"engine": engine, "path": path, "metrics": metrics, "run": loop.run_until_complete,
           "references": references}
    loop.run_until_complete(engine.close())
    loop.close()


def _body(prompt: str | list[int]) -> dict:
    return {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "logprobs": TOP}


def _check_finish(choice: dict, ref: Reference) -> None:
    assert choice["finish_reason"] == ("stop" if ref.stopped else "length")


def _alone(setup, prompt: str | list[int]) -> dict:
    """The engine's answer to ``prompt`` as the first request of a freshly loaded model."""
    engine, run = setup["engine"], setup["run"]
    run(engine.unload(MODEL))
    answer = run(openai_api.complete(engine, MODEL, setup["path"], _body(prompt)))
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    return answer


def test_one_request_alone_is_llama_cpp_python_token_for_token(setup):
    for prompt in PROMPTS:
        ref = setup["references"][prompt]
        answer = _alone(setup, prompt)
        choice, logprobs = answer["choices"][0], answer["choices"][0]["logprobs"]
        assert answer["usage"]["prompt_tokens"] == len(ref.prompt_ids), prompt  # one BOS
        assert logprobs["tokens"] == ref.pieces, prompt
        assert choice["text"] == "".join(ref.pieces)
        _check_finish(choice, ref)
        np.testing.assert_allclose(logprobs["token_logprobs"], ref.chosen,
                                   rtol=0, atol=SOLO_TOLERANCE, err_msg=prompt)
        for position, alternatives in enumerate(logprobs["top_logprobs"]):
            assert len(alternatives) == TOP
            for text, value in alternatives.items():
                assert value == pytest.approx(ref.top[position][text], abs=SOLO_TOLERANCE), (
                    prompt, position, text)


def test_a_token_id_prompt_is_the_same_request_as_its_text(setup):
    ref = setup["references"][PROMPTS[-1]]
    # Llama's own tokens of the prompt (its BOS included): the engine adds nothing to them
    answer = _alone(setup, ref.prompt_ids)
    assert answer["usage"]["prompt_tokens"] == len(ref.prompt_ids)
    assert answer["choices"][0]["logprobs"]["tokens"] == ref.pieces


def test_batched_answers_leave_the_reference_only_at_near_ties(setup):
    engine, path, run, metrics = setup["engine"], setup["path"], setup["run"], setup["metrics"]

    async def together():
        return await asyncio.gather(
            *(openai_api.complete(engine, MODEL, path, _body(p)) for p in PROMPTS)
        )

    run(engine.unload(MODEL))  # every slot empty: no prompt reuses another's cells
    answers = run(together())
    peak = metrics.registry.get_sample_value("llmlb_node_decode_batch_sequences_peak")
    assert peak == len(PROMPTS)  # they really were decoded together
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ref = setup["references"][prompt]
        logprobs = answer["choices"][0]["logprobs"]
        tokens = logprobs["tokens"]
        split = next(
            (i for i, (a, b) in enumerate(zip(tokens, ref.pieces, strict=False)) if a != b),
            None,
        )
        same = len(ref.pieces) if split is None else split
        np.testing.assert_allclose(logprobs["token_logprobs"][:same], ref.chosen[:same],
                                   rtol=0, atol=BATCH_NOISE, err_msg=prompt)
        if split is None:
            assert tokens == ref.pieces, prompt
            _check_finish(answer["choices"][0], ref)
            continue
        ranked = sorted(logprobs["top_logprobs"][split].items(), key=lambda kv: -kv[1])
        (first, best), (second, runner_up) = ranked[:2]
        assert first == tokens[split]
        assert best - runner_up < NEAR_TIE, (prompt, split, ranked)
        assert second == ref.pieces[split], (prompt, split, ranked, ref.pieces[split])
