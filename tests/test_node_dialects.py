"""Unit tests of the dialects on the typed chat contract (llmlb.node.api.responses,
llmlb.node.api.anthropic, llmlb.node.api.openai_response, llmlb.node.inference.contract,
llmlb.anthropic_errors): request bodies into typed chat requests, and recorded typed event
streams into each dialect's events, each event checked against the official SDK's own type."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anthropic.types as at
import orjson
import pytest
from llmlb import anthropic_errors
from llmlb.errors import ApiError, ContextLengthExceeded
from llmlb.node.api import anthropic as anthropic_api
from llmlb.node.api import openai_request, openai_response
from llmlb.node.api import responses as responses_api
from llmlb.node.inference import contract as ev
from llmlb.node.inference.contract import Tool, ToolCall
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}

TWO_CALLS: list[ev.ChatEvent] = [
    ev.ToolCallStart(0, "call_a", "get_weather"),
    ev.ToolCallArgs(0, '{"city": '),
    ev.ToolCallArgs(0, '"Paris"}'),
    ev.ToolCallStart(1, "call_b", "get_weather"),
    ev.ToolCallArgs(1, '{"city": "Oslo"}'),
    ev.Done("tool_calls"),
    ev.Usage(30, 12, 0),
]


class Closable:
    """A recorded event stream with the engine stream's ``aclose``, ``choices`` and
    ``prompt_tokens``."""

    def __init__(self, events: list, prompt_tokens: int = 30):
        self.events = list(events)
        self.closed = False
        self.choices = 1
        self.prompt_tokens = prompt_tokens

    def __aiter__(self) -> Closable:
        return self

    async def __anext__(self):
        if self.closed or not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def _drain(events: AsyncIterator) -> list:
    return [event async for event in events]


def run(coro):
    return asyncio.run(coro)


def sse(body: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in body.split(b"\n\n"):
        if not block.strip():
            continue
        head, data = block.split(b"\n", 1)
        out.append((head.removeprefix(b"event: ").decode(), orjson.loads(data[6:])))
    return out


def answer(text: str, finish: str, calls: list[ToolCall] | None = None, prompt: int = 9,
           completion: int = 4) -> ev.Answer:  # fmt: skip
    """A whole answer as the engine returns it."""
    return ev.Answer([ev.Choice(0, text, finish, calls or [])], ev.Usage(prompt, completion))


# -- events: stop strings, whole answers, OpenAI chunks ----------------------------------


def test_openai_chunks_of_two_tool_calls_parse_as_the_sdks_chunks():
    shaper = openai_response.Shaper(True, "m")
    stream = openai_response.SSEStream(shaper, Closable(TWO_CALLS), include_usage=True)
    body = run(_body(stream))
    assert body.endswith(b"data: [DONE]\n\n")
    chunks = [orjson.loads(b[6:]) for b in body.split(b"\n\n") if b.startswith(b"data: {")]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:6]]
    assert deltas[0] == {"index": 0, "id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"city": '}}
    assert deltas[3]["index"] == 1 and deltas[3]["id"] == "call_b"
    assert chunks[6]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[7]["choices"] == [] and chunks[7]["usage"]["total_tokens"] == 42


def test_stop_string_across_pieces_is_named_and_cancels():
    source = Closable(
        [
            ev.TextDelta("Hel"),
            ev.TextDelta("lo wor"),
            ev.TextDelta("ld"),
            ev.Done("stop"),
            ev.Usage(5, 4),
        ]
    )
    events = run(_drain(ev.cut_at_stop(source, ("xyz", "o w"))))
    text = "".join(e.text for e in events if isinstance(e, ev.TextDelta))
    assert text == "Hell"
    assert ev.Done("stop_sequence", 0, "o w") in events
    assert events[-1] == ev.Usage(None, 2)  # cut before the engine counted
    assert source.closed  # the generation was cancelled


def test_first_matching_stop_string_wins():
    source = Closable([ev.TextDelta("a. b! c"), ev.Done("stop")])
    events = run(_drain(ev.cut_at_stop(source, ("!", "."))))
    assert ev.Done("stop_sequence", 0, ".") in events


def test_failed_run_is_one_error_event():
    error = ev.Error("boom")
    events = run(_drain(ev.cut_at_stop(Closable([error]), ("x",))))
    assert events == [error]
    with pytest.raises(ApiError) as caught:
        run(ev.collect(Closable([ev.TextDelta("Hi"), error])))
    assert caught.value.status == 500


def test_collect_assembles_tool_calls():
    result = run(ev.collect(Closable(TWO_CALLS)))
    (choice,) = result.choices
    assert [(c.id, c.arguments) for c in choice.tool_calls] == [
        ("call_a", '{"city": "Paris"}'),
        ("call_b", '{"city": "Oslo"}'),
    ]
    assert choice.finish_reason == "tool_calls" and result.usage.completion_tokens == 12


# -- Responses: request ------------------------------------------------------------------


def test_responses_items_become_chat_messages():
    request = responses_api.parse_request(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
            "tools": [{"type": "function", "name": "w", "parameters": WEATHER}],
            "tool_choice": {"type": "function", "name": "w"},
            "max_output_tokens": 20,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": WEATHER}},
        }
    )
    chat = request.chat
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.messages[1] == {"role": "user", "content": "Weather?"}
    assert [c["id"] for c in chat.messages[2]["tool_calls"]] == ["c1", "c2"]
    assert chat.messages[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": {}}
    assert chat.messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}
    assert len(chat.messages) == 4
    assert chat.tools == [Tool("w", "", WEATHER)]
    assert chat.tool_choice == "w"
    assert chat.generation.max_tokens == 20
    assert chat.generation.grammar_schema == WEATHER


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"store": True}, "store", "no state"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "no state"),
        ({"conversation": "conv_1"}, "conversation", "no state"),
        ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type", "web_search_preview"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", "code_interpreter"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
            "input_image",
        ),
        ({"input": []}, "input", "non-empty"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "grammar"),
        ({"max_output_tokens": 0}, "max_output_tokens", "positive"),
        ({"reasoning": "high"}, "reasoning", "object"),
        ({"reasoning": {"effort": "max"}}, "reasoning.effort", "minimal"),
        ({"reasoning": {"summary": "long"}}, "reasoning.summary", "concise"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "message"),
    ],
)
def test_responses_bad_bodies_are_400_naming_the_field(body, param, words):
    with pytest.raises(ApiError) as caught:
        responses_api.parse_request({"model": "m", "input": "hi", **body})
    assert caught.value.status == 400 and caught.value.param == param
    assert words in caught.value.message


# -- Responses: answer -------------------------------------------------------------------


class RecordedEngine:
    """Answers ``chat`` with recorded events (streamed) or a recorded whole answer."""

    def __init__(self, events: list | None = None, answer: ev.Answer | None = None):
        self.events, self.answer, self.requests = events, answer, []

    async def chat(self, model_id, path, request):
        self.requests.append(request)
        return Closable(self.events) if request.generation.stream else self.answer

    async def count_chat_tokens(self, model_id, path, request):
        return 30


async def _body(result) -> bytes:
    return b"".join([part async for part in result])


def test_responses_stream_of_two_calls_parses_as_the_sdks_events():
    engine = RecordedEngine(TWO_CALLS)
    result = run(
        responses_api.create(engine, "m", "/p", {"model": "m", "input": "hi", "stream": True})
    )
    events = sse(run(_body(result)))
    adapter = TypeAdapter(ResponseStreamEvent)
    for kind, data in events:
        assert kind == data["type"]
        adapter.validate_python(data)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    kinds = [k for k, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(events[-1][1]["response"])
    assert [(o.call_id, o.arguments) for o in final.output] == [
        ("call_a", '{"city": "Paris"}'),
        ("call_b", '{"city": "Oslo"}'),
    ]
    assert [d["output_index"] for k, d in events if k == "response.output_item.added"] == [0, 1]
    assert final.usage.input_tokens == 30 and final.usage.output_tokens == 12
    assert engine.requests[0].generation.stream


def test_responses_empty_answer_still_has_its_message():
    engine = RecordedEngine([ev.Done("stop"), ev.Usage(3, 1)])
    result = run(
        responses_api.create(engine, "m", "/p", {"model": "m", "input": "hi", "stream": True})
    )
    events = sse(run(_body(result)))
    final = Response.model_validate(events[-1][1]["response"])
    assert final.status == "completed" and final.output[0].type == "message"
    assert final.output_text == ""


def test_responses_failed_stream_ends_with_response_failed():
    engine = RecordedEngine([ev.TextDelta("Hi"), ev.Error("boom")])
    result = run(
        responses_api.create(engine, "m", "/p", {"model": "m", "input": "hi", "stream": True})
    )
    kind, data = sse(run(_body(result)))[-1]
    assert kind == "response.failed" and data["response"]["status"] == "failed"
    assert data["response"]["error"] == {"code": "inference_failed", "message": "boom"}


def test_responses_whole_answer_with_text_and_a_call():
    completion = answer("Let me look.", "tool_calls", [ToolCall("w", "{}", id="call_1")])
    body = run(
        responses_api.create(
            RecordedEngine(answer=completion), "m", "/p", {"model": "m", "input": "hi"}
        )
    )
    response = Response.model_validate(body)
    assert [o.type for o in response.output] == ["message", "function_call"]
    assert response.output_text == "Let me look." and response.output[1].call_id == "call_1"
    assert response.usage.total_tokens == 13


# -- Anthropic: request ------------------------------------------------------------------


def test_anthropic_history_becomes_chat_messages():
    request = anthropic_api.parse_request(
        {
            "model": "m",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "s"},
                        {"type": "text", "text": "Looking."},
                        {"type": "tool_use", "id": "tu_1", "name": "w", "input": {"city": "P"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "tu_1",
                            "content": [{"type": "text", "text": "Sunny"}],
                        },
                        {"type": "text", "text": "Thanks"},
                    ],
                },
            ],
            "tools": [{"name": "w", "description": "weather", "input_schema": WEATHER}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "stop_sequences": ["END", "END", ""],
            "top_k": 5,
            "temperature": 0.5,
            "metadata": {"user_id": "u1"},
        }
    )
    chat = request.chat
    assert chat.messages == [
        {"role": "system", "content": "A\n\nB"},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Looking.",
            "tool_calls": [
                {
                    "id": "tu_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"city": "P"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "tu_1", "content": "Sunny"},
        {"role": "user", "content": "Thanks"},
    ]
    assert chat.tools == [Tool("w", "weather", WEATHER)]
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.generation.stop == () and request.stop == ("END",)  # matched by the node itself
    sampling = chat.generation.sampling
    assert (sampling.top_k, sampling.temperature, chat.generation.user) == (5, 0.5, "u1")


def test_anthropic_named_tool_choice():
    request = anthropic_api.parse_request(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "w", "input_schema": WEATHER}],
            "tool_choice": {"type": "tool", "name": "w"},
        }
    )
    assert request.chat.tool_choice == "w"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"name": "w"}]}, "tools[0].input_schema"),
        (
            {"tool_choice": {"type": "sometimes"}, "tools": [{"name": "w", "input_schema": {}}]},
            "tool_choice.type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"thinking": {"type": "sometimes"}}, "thinking"),
        ({"thinking": True}, "thinking"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, "thinking.budget_tokens"),
    ],
)
def test_anthropic_bad_bodies_are_400_naming_the_field(body, param):
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ApiError) as caught:
        anthropic_api.parse_request({k: v for k, v in {**base, **body}.items() if v is not None})
    assert caught.value.status == 400 and caught.value.param == param


_RESPONSES = {"model": "m", "input": "hi"}
_MESSAGES = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("parse", "base", "tool", "param", "message"),
    [
        (
            responses_api.parse_request,
            _RESPONSES,
            {"type": "web_search_preview"},
            "tools[0].type",
            "the built-in tool 'web_search_preview' is not available on this node "
            "(only 'function' tools are)",
        ),
        (
            responses_api.parse_request,
            _RESPONSES,
            {"type": "function", "name": ""},
            "tools[0].name",
            "'tools[0].name' must be a non-empty string",
        ),
        (
            anthropic_api.parse_request,
            _MESSAGES,
            {"type": "web_search_20250305", "name": "web_search"},
            "tools[0].type",
            "the built-in tool 'web_search_20250305' is not available on this node "
            "(only custom tools with an 'input_schema' are)",
        ),
        (
            anthropic_api.parse_request,
            _MESSAGES,
            {"name": 5, "input_schema": {}},
            "tools[0].name",
            "'tools[0].name' must be a non-empty string",
        ),
    ],
)
def test_a_built_in_or_unnamed_tool_is_worded_alike_in_responses_and_messages(
    parse, base, tool, param, message
):
    with pytest.raises(ApiError) as caught:
        parse({**base, "tools": [tool]})
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message == message


# -- Anthropic: answer -------------------------------------------------------------------


def test_anthropic_stream_of_text_and_a_tool_use_parses_as_the_sdks_events():
    chunks = [
        ev.TextDelta("Let me "),
        ev.TextDelta("look."),
        *TWO_CALLS[0:3],
        ev.Done("tool_calls"),
        ev.Usage(30, 9),
    ]
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    events = sse(run(_body(run(anthropic_api.create(RecordedEngine(chunks), "m", "/p", body)))))
    adapter = TypeAdapter(at.RawMessageStreamEvent)
    for kind, data in events:
        assert kind == data["type"]
        adapter.validate_python(data)
    assert [k for k, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 30
    assert events[5][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}},
    }
    assert events[7][1]["delta"] == {"type": "input_json_delta", "partial_json": '"Paris"}'}
    assert events[9][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[9][1]["usage"]["output_tokens"] == 9


def test_anthropic_whole_answer_names_its_stop_sequence():
    chunks = [
        ev.TextDelta("one, two, thr"),
        ev.TextDelta("ee, four"),
        ev.Done("stop"),
        ev.Usage(7, 6),
    ]
    engine = RecordedEngine(chunks)
    body = {
        "model": "m",
        "max_tokens": 50,
        "stop_sequences": ["three"],
        "messages": [{"role": "user", "content": "count"}],
    }
    message = at.Message.model_validate(run(anthropic_api.create(engine, "m", "/p", body)))
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "three"
    assert message.content[0].text == "one, two, "
    assert message.usage.input_tokens == 30  # counted: the cut run never reported it
    assert engine.requests[0].generation.stop == ()


def test_anthropic_whole_answer_stop_reasons():
    def whole(finish: str, calls: list | None = None) -> ev.Answer:
        return answer("" if calls else "Hi", finish, calls, 4, 2)

    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for finish, reason in (("stop", "end_turn"), ("length", "max_tokens")):
        out = run(anthropic_api.create(RecordedEngine(answer=whole(finish)), "m", "/p", body))
        assert at.Message.model_validate(out).stop_reason == reason
    calls = [ToolCall("w", '{"a":1}', id="c1")]
    out = run(
        anthropic_api.create(RecordedEngine(answer=whole("tool_calls", calls)), "m", "/p", body)
    )
    message = at.Message.model_validate(out)
    assert message.stop_reason == "tool_use"
    assert [(b.type, b.input) for b in message.content] == [("tool_use", {"a": 1})]


def test_anthropic_failed_stream_ends_with_an_error_event():
    body = {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    engine = RecordedEngine([ev.TextDelta("Hi"), ev.Error("boom")])
    kind, data = sse(run(_body(run(anthropic_api.create(engine, "m", "/p", body)))))[-1]
    assert kind == "error"
    assert data == {"type": "error", "error": {"type": "api_error", "message": "boom"}}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
        (409, "invalid_request_error"),
    ],
)
def test_anthropic_error_types_follow_the_status(status, kind):
    body = orjson.loads(anthropic_errors.from_api_error(ApiError(status, "c", "m")))
    assert body == {"type": "error", "error": {"type": kind, "message": "m"}}


def test_anthropic_shaped_bodies_are_not_reshaped():
    theirs = anthropic_errors.error_body(400, "bad")
    assert anthropic_errors.from_openai_body(theirs, 400) is theirs
    ours = ApiError(503, "overloaded", "busy").body()
    assert orjson.loads(anthropic_errors.from_openai_body(ours, 503))["error"] == {
        "type": "overloaded_error",
        "message": "busy",
    }


# -- one rule for reasoning fields in every dialect ---------------------------------------


@pytest.mark.parametrize("effort", [None, "none", "minimal", "low", "medium", "high", "xhigh"])
def test_valid_reasoning_fields_are_accepted_and_change_nothing(effort):
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert openai_request.chat_request({**plain, "reasoning_effort": effort}) == (
        openai_request.chat_request(plain)
    )
    reasoning = {"effort": effort, "summary": "auto"}
    asked = responses_api.parse_request({"model": "m", "input": "hi", "reasoning": reasoning})
    assert asked.chat == responses_api.parse_request({"model": "m", "input": "hi"}).chat
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"},
                     {"type": "adaptive"}):  # fmt: skip
        asked = anthropic_api.parse_request({**base, "thinking": thinking})
        assert asked.chat == anthropic_api.parse_request(base).chat


@pytest.mark.parametrize("effort", ["max", 3, {"level": "high"}])
def test_an_invalid_reasoning_effort_on_chat_is_400_naming_it(effort):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "reasoning_effort": effort}
    with pytest.raises(ApiError) as caught:
        openai_request.chat_request(body)
    assert caught.value.status == 400 and caught.value.param == "reasoning_effort"


# -- context overflow in each dialect's words --------------------------------------------


def test_context_overflow_is_worded_as_openai_and_anthropic_word_it():
    asked = ContextLengthExceeded(1024, 40, 2000)
    assert asked.message.startswith(
        "This model's maximum context length is 1024 tokens. However, you requested 2040 "
        "tokens (40 in the messages, 2000 in the completion). Please reduce the length of the "
        "messages or completion."
    )
    body = orjson.loads(asked.body())["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    assert body["type"] == "invalid_request_error"
    too_long = ContextLengthExceeded(1024, 1500, None)
    assert too_long.param == "messages"
    assert "However, your messages resulted in 1500 tokens." in too_long.message
    legacy = ContextLengthExceeded(1024, 1500, 16, chat=False)
    assert legacy.param == "prompt" and legacy.message.startswith(
        "This model's maximum context length is 1024 tokens, however you requested 1516 tokens "
        "(1500 in your prompt; 16 for the completion)."
    )
    renamed = asked.renamed("input", "max_output_tokens")
    assert renamed.param == "max_output_tokens" and renamed.message == asked.message
    assert too_long.renamed("input", "max_output_tokens").param == "input"
    shaped = orjson.loads(anthropic_errors.from_api_error(too_long))["error"]
    assert shaped == {"type": "invalid_request_error",
                      "message": "prompt is too long: 1500 tokens > 1023 maximum"}
    assert orjson.loads(anthropic_errors.from_api_error(asked))["error"]["message"] == (
        "input length and `max_tokens` exceed context limit: 40 + 2000 > 1024, decrease input "
        "length or `max_tokens` and try again"
    )


class OverflowingEngine:
    """Refuses every chat as too long for its context."""

    async def chat(self, model_id, path, request):
        raise ContextLengthExceeded(1024, 1500, request.generation.max_tokens)


def test_responses_names_its_own_fields_in_a_context_overflow():
    with pytest.raises(ContextLengthExceeded) as caught:
        asyncio.run(responses_api.create(OverflowingEngine(), "m", "p",
                                         {"model": "m", "input": "hi", "max_output_tokens": 4}))
    assert caught.value.param == "input"


# -- a call cut by max_tokens -------------------------------------------------------------


def test_responses_and_messages_mark_the_item_a_cut_call_ended_in():
    call = ToolCall("get_weather", '{"city": "Par', id="call_1", complete=False)
    cut = answer("", "length", [call], 9, 20)
    engine = RecordedEngine(answer=cut)
    response = asyncio.run(responses_api.create(engine, "m", "p", {"model": "m", "input": "hi"}))
    Response.model_validate(response)
    assert response["status"] == "incomplete"
    (item,) = response["output"]
    assert item["type"] == "function_call" and item["status"] == "incomplete"
    assert item["arguments"] == '{"city": "Par'
    body = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    message = asyncio.run(anthropic_api.create(engine, "m", "p", body))
    at.Message.model_validate(message)
    assert message["stop_reason"] == "max_tokens"
    (block,) = message["content"]
    assert block["type"] == "tool_use" and block["input"] == {"city": "Par"}
