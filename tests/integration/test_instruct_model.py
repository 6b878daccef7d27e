"""Answers that must make sense, from the instruction-tuned model ``llmlb up`` serves
(SmolLM2-135M-Instruct, ChatML template in its GGUF) through a real router and node: an answer
that ends by itself, ChatML in all three dialects, the stop on the end-of-turn token, a forced
tool call that ends after one call, the model's stored sampling defaults, and ``llmlb chat``
holding a conversation (issue 22).

Sampled answers carry a ``seed``: a seeded request is repeatable on one node."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from llmlb.cli.demo import SMOLLM2_DEFAULTS

from tests.node_fixtures import call, smollm2_behind_router
from tests.procs import LLMLB

ADMIN = "sk-admin-instruct"
MODEL = "smollm2-135m-instruct"
HAIKU = "Write a haiku about load balancers."
ROOM = 200  # max_tokens: room to end by itself (its answers here take 15 to 100 tokens)
MARKERS = ("<|im_start|>", "<|im_end|>")
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# The ChatML prompt SmolLM2's own template renders for one user turn (its default system
# message comes first when the conversation has none).
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(system: str, user: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, smollm2_gguf):
    with smollm2_behind_router(tmp_path_factory, smollm2_gguf, MODEL, ADMIN) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def vocab(smollm2_gguf):
    """SmolLM2's tokenizer alone (llama.cpp, vocabulary only), to count a prompt's tokens."""
    from llama_cpp import Llama

    return Llama(str(smollm2_gguf), vocab_only=True, verbose=False)


def words(text: str | None) -> str:
    """An answer that reads as text: words, and no template marker leaked into it."""
    assert text and re.search(r"[A-Za-z]{3,}", text), text
    assert not any(m in text for m in MARKERS), text
    return text


def test_an_answer_ends_by_itself_before_max_tokens(oai):
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": HAIKU}], max_tokens=ROOM, seed=1
    )
    choice = reply.choices[0]
    words(choice.message.content)
    assert choice.finish_reason == "stop"
    assert 0 < reply.usage.completion_tokens < ROOM

    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "List three colors."}],
            max_tokens=ROOM,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    words(text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert 0 < chunks[-1].usage.completion_tokens < ROOM


def test_chatml_template_in_all_three_dialects(oai, claude, vocab):
    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=True))

    for system in (None, "You are a poet."):
        expected = count(chatml(system or DEFAULT_SYSTEM, HAIKU))
        messages = [{"role": "user", "content": HAIKU}]
        chat = oai.chat.completions.create(
            model=MODEL,
            messages=([{"role": "system", "content": system}] if system else []) + messages,
            max_tokens=ROOM,
            seed=2,
        )
        assert chat.usage.prompt_tokens == expected, system
        assert chat.choices[0].finish_reason == "stop"
        words(chat.choices[0].message.content)

        extra = {"instructions": system} if system else {}
        response = oai.responses.create(
            model=MODEL, input=HAIKU, max_output_tokens=ROOM, extra_body={"seed": 2}, **extra
        )
        assert response.usage.input_tokens == expected, system
        assert response.status == "completed"
        words(response.output_text)

        extra = {"system": system} if system else {}
        message = claude.messages.create(model=MODEL, messages=messages, max_tokens=ROOM, **extra)
        assert message.usage.input_tokens == expected, system
        assert message.stop_reason == "end_turn"
        words("".join(block.text for block in message.content if block.type == "text"))


def test_stops_on_the_end_of_turn_token(fleet, vocab):
    # SmolLM2 ends a turn with <|im_end|>, one token: the answer stops there, in chat (the
    # template's turn marker) and in a completion of a hand-written ChatML prompt alike.
    assert len(vocab.tokenize(b"<|im_end|>", add_bos=False, special=True)) == 1
    prompt = chatml(DEFAULT_SYSTEM, HAIKU)
    reply = call(
        fleet["router"],
        "POST",
        "/v1/completions",
        fleet["key"],
        {"model": MODEL, "prompt": prompt, "max_tokens": ROOM, "seed": 3},
    )
    assert reply.status == 200, reply.body
    choice = reply.json["choices"][0]
    assert choice["finish_reason"] == "stop"
    words(choice["text"])
    assert 0 < reply.json["usage"]["completion_tokens"] < ROOM


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_a_forced_tool_call_ends_after_one_call(oai, choice):
    tool_choice = (
        choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    )
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[CHAT_TOOL],
        tool_choice=tool_choice,
        max_tokens=ROOM,
        seed=4,
    )
    answer = reply.choices[0]
    assert answer.finish_reason == "tool_calls"
    calls = answer.message.tool_calls or []
    assert len(calls) == 1, calls
    assert calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    assert reply.usage.completion_tokens < ROOM


def test_forced_tool_calls_in_responses_and_messages(oai, claude):
    response = oai.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}],
        tool_choice="required",
        max_output_tokens=ROOM,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)

    message = claude.messages.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[{"name": "get_weather", "input_schema": WEATHER}],
        tool_choice={"type": "any"},
        max_tokens=ROOM,
    )
    uses = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert len(uses) == 1 and isinstance(uses[0].input["city"], str)


def test_the_models_sampling_defaults_apply_where_a_request_sets_none(oai):
    # The store holds SmolLM2's defaults (generation_defaults.json): a request that sets no
    # sampling field answers exactly as one that sets those values itself (same seed).
    def answer(**sampling) -> str:
        reply = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about cats."}],
            max_tokens=48,
            seed=5,
            **sampling,
        )
        return reply.choices[0].message.content or ""

    plain = answer()
    stored = {k: v for k, v in SMOLLM2_DEFAULTS.items() if k != "repeat_penalty"}
    explicit = answer(**stored, extra_body={"repeat_penalty": SMOLLM2_DEFAULTS["repeat_penalty"]})
    assert plain == explicit
    # A value the request sets wins over the stored one.
    assert answer(temperature=0) == answer(temperature=0)


def test_llmlb_chat_holds_a_conversation(fleet):
    # Two turns on stdin: the second is sent with the first and its answer, so the node's
    # prompt cache serves that prefix, which --verbose shows as cached tokens.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMLB_")}
    result = subprocess.run(
        [*LLMLB, "chat", MODEL, "--verbose", "--router", fleet["router"]]
        + ["--api-key", fleet["key"], "--max-tokens", str(ROOM)],
        input="What is a load balancer?\nGive one example of one.\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    timing = re.findall(
        r"\[ttft [\d.]+ s · (\d+) tokens in [\d.]+ s[^·]*· prompt (\d+) tokens, (\d+) cached · "
        r"(\w+)\]",
        result.stderr,
    )
    assert len(timing) == 2, result.stderr
    (out1, prompt1, _cached1, end1), (_out2, prompt2, cached2, end2) = timing
    assert end1 == end2 == "stop"
    assert int(prompt2) > int(prompt1) + int(out1)  # the history was resent
    assert int(cached2) >= int(prompt1)  # ... and its first turn came from the cache
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2 and all(words(a) for a in answers[:1])
