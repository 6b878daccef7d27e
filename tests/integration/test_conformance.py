"""Conformance with real clients through a real router and node serving the real Gemma:
penalties with valid values, context overflows that LiteLLM, LangChain and Anthropic's SDK
recognise, tool calls cut by ``max_tokens`` or repeated by a forced grammar, and the
reasoning fields of the three dialects (issue 26)."""

from __future__ import annotations

import asyncio
import os
import re

import anthropic
import openai
import orjson
import pytest

from tests.node_fixtures import (
    gemma_behind_router,
)

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download

ADMIN = "sk-admin-conformance"
MODEL = "local/gemma-conformance"
CONTEXT = 1024  # start_node's --ctx-size
LONG = "word " * 1500  # more tokens than the context
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
RESPONSES_TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER}
MESSAGES_TOOL = {"name": "get_weather", "input_schema": WEATHER}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"extra_body": {"temperature": 0}}  # anthropic's SDK takes no sampling arguments
MARKERS = ("<tool_call>", "</tool_call>", "<tool_", '{"name"')


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf):
    """A router and one node holding Gemma (hand-placed), and an api key."""
    with gemma_behind_router(tmp_path_factory, gemma_gguf, MODEL, ADMIN) as fleet:
        yield fleet


# -- penalties ------------------------------------------------------------------------


def _repeats(tokens: list[str]) -> int:
    """Tokens of an answer that repeat an earlier one."""
    return len(tokens) - len(set(tokens))


# Greedy answers that repeat themselves: every penalty makes them repeat less (measured on
# this model: 23 repeated tokens of 32 on each route, 0 to 13 with a penalty).
REPETITIVE_CHAT = "Once upon a time there was a"
REPETITIVE_PROMPT = "I like cats because cats are"
PENALTIES = [{"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"repeat_penalty": 1.3}]


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: next(iter(p)))
def test_penalties_answer_200_and_repeat_less(oai, penalty):
    # the SDK sends repeat_penalty (llama.cpp's) only as an extra field
    asked = {"extra_body": penalty} if "repeat_penalty" in penalty else penalty

    def chat(**extra) -> list[str]:
        answer = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": REPETITIVE_CHAT}],
            max_tokens=32, temperature=0, logprobs=True, **extra,
        )  # fmt: skip
        return [entry.token for entry in answer.choices[0].logprobs.content]

    def complete(**extra) -> list[str]:
        answer = oai.completions.create(
            model=MODEL, prompt=REPETITIVE_PROMPT, max_tokens=32, temperature=0, logprobs=0,
            **extra,
        )  # fmt: skip
        return answer.choices[0].logprobs.tokens

    for route in (chat, complete):
        plain, penalised = route(), route(**asked)
        assert _repeats(penalised) < _repeats(plain), (route, plain, penalised)


def test_penalties_stream_too(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": REPETITIVE_CHAT}], max_tokens=8,
        temperature=0, stream=True, presence_penalty=1.0, frequency_penalty=1.0,
        extra_body={"repeat_penalty": 1.1},
    )  # fmt: skip
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] in ("stop", "length")


# -- context overflow -----------------------------------------------------------------

OPENAI_WORDING = re.compile(
    r"This model's maximum context length is 1024 tokens\. However, you requested (\d+) "
    r"tokens \((\d+) in the messages, (\d+) in the completion\)\. Please reduce the length of "
    r"the messages or completion\."
)


def test_openai_sdk_sees_openai_wording_and_the_field(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2000
        )
    error = caught.value
    assert error.code == "context_length_exceeded" and error.param == "max_tokens"
    assert error.type == "invalid_request_error"
    requested, prompt, completion = map(int, OPENAI_WORDING.search(str(error)).groups())
    assert completion == 2000 and requested == prompt + completion
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}])
    assert caught.value.param == "messages"
    assert "maximum context length is 1024 tokens. However, your messages resulted in" in str(
        caught.value
    )
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=LONG, max_tokens=4, stream=True)
    assert caught.value.param == "prompt"
    assert "maximum context length is 1024 tokens, however you requested" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=MODEL, input=LONG, max_output_tokens=16)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "input"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=MODEL, input="Hi", max_output_tokens=2000)
    assert caught.value.param == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_litellm_raises_context_window_exceeded(fleet, stream):
    import litellm

    with pytest.raises(litellm.ContextWindowExceededError):
        response = litellm.completion(
            model=f"openai/{MODEL}", api_base=f"{fleet['router']}/v1", api_key=fleet["key"],
            messages=[{"role": "user", "content": LONG}], max_tokens=8, stream=stream,
            num_retries=0,
        )  # fmt: skip
        if stream:
            list(response)


def test_litellm_anthropic_route_raises_context_window_exceeded(fleet):
    import litellm
    from litellm.anthropic_interface import messages

    with pytest.raises(litellm.ContextWindowExceededError):
        asyncio.run(
            messages.acreate(
                model=f"anthropic/{MODEL}", api_base=fleet["router"], api_key=fleet["key"],
                max_tokens=8, messages=[{"role": "user", "content": LONG}],
            )
        )  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_raises_context_overflow(fleet, stream):
    from langchain_core.exceptions import ContextOverflowError
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        model=MODEL, base_url=f"{fleet['router']}/v1", api_key=fleet["key"], max_retries=0,
        max_tokens=8, streaming=stream,
    )  # fmt: skip
    with pytest.raises(ContextOverflowError) as caught:
        model.invoke(LONG)
    assert isinstance(caught.value, openai.BadRequestError)  # and still the SDK's error


def test_anthropic_sdk_sees_anthropic_wording(claude):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user",
                                                                    "content": LONG}])
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error"
    prompt, maximum = map(int, re.fullmatch(
        r"prompt is too long: (\d+) tokens > (\d+) maximum", error["message"]).groups())
    assert prompt > maximum == CONTEXT - 1
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=5000,
                               messages=[{"role": "user", "content": "Hi"}])
    assert re.fullmatch(
        r"input length and `max_tokens` exceed context limit: \d+ \+ 5000 > 1024, decrease "
        r"input length or `max_tokens` and try again",
        caught.value.body["error"]["message"],
    )
    streamed = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": LONG}]}
    with pytest.raises(anthropic.BadRequestError) as caught, claude.messages.stream(
        **streamed
    ) as events:  # the error comes before any event
        list(events)
    assert caught.value.body["error"]["message"].startswith("prompt is too long: ")


# -- tool calls cut by max_tokens -------------------------------------------------------

# max_tokens that end a forced call inside its name, inside its arguments, and just after.
CUTS = [6, 20, 24]


def _no_markers(text: str | None) -> None:
    assert not any(m in (text or "") for m in MARKERS), text


@pytest.mark.parametrize("max_tokens", CUTS)
def test_a_cut_forced_call_never_leaks_template_text_on_chat(oai, max_tokens):
    body = {"model": MODEL, "messages": ASK, "tools": [CHAT_TOOL], "tool_choice": "required",
            "max_tokens": max_tokens, "temperature": 0}
    whole = oai.chat.completions.create(**body).choices[0]
    _no_markers(whole.message.content)
    assert whole.finish_reason == "length"
    streamed = list(oai.chat.completions.create(**body, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    _no_markers(text)
    deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert streamed[-1].choices[0].finish_reason == "length"
    if whole.message.tool_calls:  # its name was whole: returned as OpenAI returns a cut call
        (cut,) = whole.message.tool_calls
        assert cut.function.name == "get_weather"
        assert '{"city": "Paris"}'.startswith(cut.function.arguments) or orjson.loads(
            cut.function.arguments) == {"city": "Paris"}
        assert deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == cut.function.arguments
    else:
        assert whole.message.content in ("", None) and deltas == []


@pytest.mark.parametrize("max_tokens", CUTS)
def test_a_cut_forced_call_never_leaks_template_text_on_responses(oai, max_tokens):
    body = {"model": MODEL, "input": ASK, "tools": [RESPONSES_TOOL], "tool_choice": "required",
            "max_output_tokens": max_tokens, "temperature": 0}
    response = oai.responses.create(**body)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    for item in response.output:
        assert item.status == "incomplete"  # the one item is the one the answer was cut in
        if item.type == "message":
            _no_markers(item.content[0].text)
            assert item.content[0].text == ""
        else:
            assert item.type == "function_call" and item.name == "get_weather"
    with oai.responses.stream(**body) as stream:
        events = list(stream)
    for event in events:
        if event.type == "response.output_text.delta":
            _no_markers(event.delta)
    final = events[-1]  # the SDK's get_final_response() wants a response.completed
    assert final.type == "response.incomplete"
    assert [i.type for i in final.response.output] == [i.type for i in response.output]
    assert all(i.status == "incomplete" for i in final.response.output)


@pytest.mark.parametrize("max_tokens", CUTS)
def test_a_cut_forced_call_never_leaks_template_text_on_messages(claude, max_tokens):
    body = {"model": MODEL, "messages": ASK, "tools": [MESSAGES_TOOL],
            "tool_choice": {"type": "any"}, "max_tokens": max_tokens, **GREEDY}
    message = claude.messages.create(**body)
    assert message.stop_reason == "max_tokens"
    for block in message.content:
        if block.type == "text":
            _no_markers(block.text)
        else:
            assert block.type == "tool_use" and block.name == "get_weather"
            assert block.input in ({}, {"city": "Paris"}) or "Paris".startswith(
                block.input.get("city", ""))
    with claude.messages.stream(**body) as stream:
        for event in stream:
            if event.type == "text":
                _no_markers(event.text)
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert [b.type for b in final.content] == [b.type for b in message.content]


# -- a forced call is not repeated ----------------------------------------------------


# Asked this with parallel calls left on, the model forced to call repeats one call until
# max_tokens (10 identical calls in 300 tokens before the fix).
CALL_IT = [{"role": "user", "content": "Call the weather tool."}]
TWO_CITIES = [{"role": "user", "content": "What's the weather like in Paris and in London?"}]


def _calls(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, orjson.loads(c.function.arguments))
            for c in choice.message.tool_calls or []]


def test_a_forced_call_with_default_parallel_calls_is_not_repeated(oai, claude):
    forced = {"model": MODEL, "tools": [CHAT_TOOL], "tool_choice": "required",
              "max_tokens": 300, "temperature": 0}
    answer = oai.chat.completions.create(messages=CALL_IT, **forced)
    calls = _calls(answer.choices[0])
    assert calls and len(calls) == len({orjson.dumps(c) for c in calls})  # no call twice
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.usage.completion_tokens < 300
    chunks = [c for c in oai.chat.completions.create(messages=CALL_IT, stream=True, **forced)
              if c.choices]  # fmt: skip
    heads = [d for c in chunks for d in c.choices[0].delta.tool_calls or [] if d.id]
    assert len(heads) == len(calls) and chunks[-1].choices[0].finish_reason == "tool_calls"
    # several different calls are kept: the answer ends at the first repeat
    both = _calls(oai.chat.completions.create(messages=TWO_CITIES, **forced).choices[0])
    assert {c[1]["city"] for c in both} >= {"Paris", "London"}
    assert len(both) == len({orjson.dumps(c) for c in both})
    response = oai.responses.create(
        model=MODEL, input=CALL_IT, tools=[RESPONSES_TOOL], tool_choice="required",
        max_output_tokens=300, temperature=0,
    )  # fmt: skip
    assert response.status == "completed" and len(response.output) == len(calls)
    message = claude.messages.create(
        model=MODEL, max_tokens=300, messages=CALL_IT, tools=[MESSAGES_TOOL],
        tool_choice={"type": "any"}, **GREEDY,
    )  # fmt: skip
    assert message.stop_reason == "tool_use" and len(message.content) == len(calls)


# -- reasoning fields: accepted and ignored when valid, 400 naming the field when not ----


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high"])
def test_valid_reasoning_fields_are_accepted_in_every_dialect(oai, claude, effort):
    chat = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        reasoning_effort=effort,
    )  # fmt: skip
    assert chat.choices[0].message.content is not None
    response = oai.responses.create(
        model=MODEL, input="Hi", max_output_tokens=2, reasoning={"effort": effort,
                                                                 "summary": "auto"},
    )  # fmt: skip
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    thinking = (
        {"type": "disabled"} if effort == "none" else {"type": "enabled", "budget_tokens": 1024}
    )
    message = claude.messages.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
        thinking=thinking, extra_body={"temperature": 0},
    )  # fmt: skip
    assert all(block.type == "text" for block in message.content)


def test_invalid_reasoning_fields_are_400_naming_the_field(oai, claude):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=2, reasoning_effort="extreme")
    assert caught.value.param == "reasoning_effort"
    for reasoning, param in (({"effort": "extreme"}, "reasoning.effort"),
                             ({"summary": "long"}, "reasoning.summary"),
                             ("high", "reasoning")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            oai.responses.create(model=MODEL, input="Hi", max_output_tokens=2,
                                 reasoning=reasoning)
        assert caught.value.param == param
    for thinking, words in (({"type": "enabled"}, "thinking.budget_tokens"),
                            ({"type": "enabled", "budget_tokens": 10}, "thinking.budget_tokens"),
                            ({"type": "sometimes"}, "'thinking'")):  # fmt: skip
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude.messages.create(model=MODEL, max_tokens=4, thinking=thinking,
                                   messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert words in caught.value.body["error"]["message"]


# -- fields named as the client sent them (issue 27) ----------------------------------

OVER_BUDGET = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 30000}}}


def test_each_dialect_names_a_bad_field_as_the_client_sent_it(oai, claude):
    with pytest.raises(openai.BadRequestError) as caught:  # a content part
        oai.chat.completions.create(
            model=MODEL, max_tokens=2,
            messages=[{"role": "user", "content": [{"type": "input_audio"}]}],
        )  # fmt: skip
    assert caught.value.param == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError) as caught:  # refused once the model is known
        oai.responses.create(
            model=MODEL, input="Hi", max_output_tokens=2,
            tools=[{"type": "function", "name": "f", "parameters": OVER_BUDGET}],
        )  # fmt: skip
    assert caught.value.param == "tools[0].parameters" and "grammar" in str(caught.value)
    with pytest.raises(openai.BadRequestError) as caught:  # a past call's arguments
        oai.responses.create(
            model=MODEL, max_output_tokens=2,
            input=[{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{x"}],
        )  # fmt: skip
    assert caught.value.param == "input[0].arguments"
    # Anthropic's errors carry no param: the message names the field
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=MODEL, max_tokens=2, messages=ASK,
            tools=[{"name": "bad name!", "input_schema": WEATHER}],
        )  # fmt: skip
    assert "'tools[0].name' must match" in str(caught.value)
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=MODEL, max_tokens=2, messages=ASK, tools=[{"name": "f", "input_schema": 3}],
        )  # fmt: skip
    assert "'tools[0].input_schema'" in str(caught.value)
    assert ".function." not in str(caught.value)
