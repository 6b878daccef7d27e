"""The Responses API and Anthropic's Messages API through a real router and node serving the
real Gemma model, spoken by the official ``openai`` and ``anthropic`` packages and by LiteLLM;
the api key as ``x-api-key``; the router's and the node's errors in each dialect's shape."""

from __future__ import annotations

import asyncio
import os

import anthropic
import jsonschema
import openai
import orjson
import pytest

from tests.node_fixtures import (
    gemma_behind_router,
)
from tests.router_fixtures import call

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download

ADMIN = "sk-admin-responses-messages"
MODEL = "local/gemma-dialects"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
COLOR = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}
# anthropic's SDK no longer takes sampling parameters as arguments; the API still does.
GREEDY = {"extra_body": {"temperature": 0}}
RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gemma_gguf):
    """A router and one node holding Gemma (hand-placed), and an api key."""
    with gemma_behind_router(tmp_path_factory, gemma_gguf, MODEL, ADMIN) as fleet:
        yield fleet


def _function_tool() -> dict:
    return {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER,
    }


# -- Responses API --------------------------------------------------------------------


def test_responses_create_text(oai):
    response = oai.responses.create(
        model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=16,
        temperature=0,
    )  # fmt: skip
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message"
    assert response.output_text
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.store is False


def test_responses_stream_text(oai):
    with oai.responses.stream(
        model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0
    ) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    for kind in RESPONSE_EVENTS:
        assert kind in kinds, kinds
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas and deltas == done.text
    final = events[-1].response
    assert final.output[0].content[0].text == deltas
    assert final.usage.output_tokens > 0


def test_responses_stream_final_response(oai):
    """``get_final_response`` needs ``response.completed``: an answer that ends by itself."""
    with oai.responses.stream(
        model=MODEL,
        input="Answer with one word: what colour is the sky?",
        max_output_tokens=64,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "color", "schema": COLOR}},
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"
    assert orjson.loads(final.output_text)["color"] in ("red", "green", "blue")


def test_responses_json_schema(oai):
    response = oai.responses.create(
        model=MODEL,
        input="Pick a colour.",
        max_output_tokens=64,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "color", "schema": COLOR, "strict": True}},
    )
    assert response.status == "completed"
    jsonschema.validate(orjson.loads(response.output_text), COLOR)


def test_responses_forced_function_call(oai):
    response = oai.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[_function_tool()],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1, response.output
    assert calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(orjson.loads(calls[0].arguments), WEATHER)


def test_responses_stream_function_call_and_its_output(oai):
    with oai.responses.stream(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[_function_tool()],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds, kinds
    assert "response.function_call_arguments.done" in kinds, kinds
    call_item = next(item for item in final.output if item.type == "function_call")
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert call_item.arguments == arguments
    jsonschema.validate(orjson.loads(arguments), WEATHER)
    # The call and its output go back as input items; the model answers in text.
    follow = oai.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {
                "type": "function_call",
                "call_id": call_item.call_id,
                "name": call_item.name,
                "arguments": call_item.arguments,
            },
            {"type": "function_call_output", "call_id": call_item.call_id, "output": "Sunny"},
        ],
        tools=[_function_tool()],
        tool_choice="none",
        max_output_tokens=16,
        temperature=0,
    )
    assert follow.output[0].type == "message" and follow.output_text


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"store": True}, "no state"),
        ({"previous_response_id": "resp_123"}, "no state"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "file_search"),
    ],
)
def test_responses_stateless_and_builtin_tools_are_400(oai, extra, words):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=MODEL, input="hi", max_output_tokens=4, **extra)
    assert words in caught.value.message


# -- Anthropic Messages API -------------------------------------------------------------


def test_messages_create_text(claude):
    message = claude.messages.create(
        model=MODEL,
        max_tokens=16,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": "Say hello."}],
        **GREEDY,
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 16


def test_messages_stream_text(claude):
    with claude.messages.stream(
        model=MODEL,
        max_tokens=12,
        messages=[{"role": "user", "content": "Say hello."}],
        **GREEDY,
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_messages_stop_sequence_is_named(claude):
    message = claude.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[{"role": "user", "content": "Write a long sentence about cats."}],
        stop_sequences=[" ", "\n"],
        **GREEDY,
    )
    assert message.stop_reason == "stop_sequence", message
    assert message.stop_sequence in (" ", "\n")
    assert " " not in message.content[0].text and "\n" not in message.content[0].text


def _weather_tool() -> dict:
    return {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}


def test_messages_forced_tool_use(claude):
    message = claude.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[_weather_tool()],
        tool_choice={"type": "tool", "name": "get_weather"},
        **GREEDY,
    )
    assert message.stop_reason == "tool_use", message
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER)
    # The tool_use and its tool_result go back in the history; the model answers in text.
    follow = claude.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [uses[0].model_dump(exclude_none=True)]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny"}],
            },
        ],
        tools=[_weather_tool()],
        tool_choice={"type": "none"},
        **GREEDY,
    )
    assert follow.content[0].type == "text"


def test_messages_stream_forced_tool_use(claude):
    with claude.messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[_weather_tool()],
        tool_choice={"type": "any"},
        **GREEDY,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and "content_block_start" in kinds
    assert "input_json" in kinds and kinds[-1] == "message_stop", kinds
    assert final.stop_reason == "tool_use"
    use = next(block for block in final.content if block.type == "tool_use")
    jsonschema.validate(use.input, WEATHER)


def test_count_tokens_matches_the_prompt(claude):
    messages = [{"role": "user", "content": "Say hello."}]
    counted = claude.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.")
    message = claude.messages.create(
        model=MODEL, max_tokens=2, messages=messages, system="Be brief.", **GREEDY
    )
    assert counted.input_tokens > 0
    assert counted.input_tokens == message.usage.input_tokens


def test_messages_errors_are_anthropic_shaped(fleet, claude):
    with pytest.raises(anthropic.BadRequestError) as caught:  # from the node
        claude.messages.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                               max_tokens=0)  # fmt: skip
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    router = fleet["router"]
    missing = call(router, "POST", "/v1/messages", fleet["key"],
                   {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert missing.status == 400
    assert missing.json["type"] == "error" and "max_tokens" in missing.json["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as caught:  # from the router
        claude.messages.create(
            model="local/nothing-here", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "model 'local/nothing-here' not found",
        },
    }
    bad_key = anthropic.Anthropic(base_url=router, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad_key.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "authentication_error"
    wrong_method = call(router, "GET", "/v1/messages", fleet["key"])
    assert wrong_method.status == 405 and wrong_method.json["type"] == "error"
    # The OpenAI routes keep OpenAI's shape.
    openai_shaped = call(router, "POST", "/v1/responses", "sk-wrong", {"model": MODEL})
    assert openai_shaped.status == 401 and openai_shaped.json["error"]["code"] == "invalid_api_key"


def test_x_api_key_works_on_every_route_with_the_same_scopes(fleet):
    router, key = fleet["router"], fleet["key"]
    assert call(router, "GET", "/v1/models", headers={"x-api-key": key}).status == 200
    assert call(router, "GET", "/v0/keys", headers={"x-api-key": key}).status == 403
    assert call(router, "GET", "/v0/keys", headers={"x-api-key": ADMIN}).status == 200
    assert call(router, "GET", "/v1/models", headers={"x-api-key": "sk-wrong"}).status == 401
    chat = call(
        router,
        "POST",
        "/v1/chat/completions",
        body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"x-api-key": key},
    )
    assert chat.status == 200, chat.body


# -- LiteLLM as a client ------------------------------------------------------------------


def test_litellm_completion_with_tools(fleet):
    import litellm

    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{fleet['router']}/v1",
        api_key=fleet["key"],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call_ = choice.message.tool_calls[0]
    assert call_.function.name == "get_weather"
    jsonschema.validate(orjson.loads(call_.function.arguments), WEATHER)


def test_litellm_responses(fleet):
    import litellm

    response = litellm.responses(
        model=f"openai/{MODEL}",
        api_base=f"{fleet['router']}/v1",
        api_key=fleet["key"],
        input="Say hello.",
        max_output_tokens=8,
        temperature=0,
    )
    assert response.output[0].type == "message"
    assert response.output[0].content[0].text


def test_litellm_anthropic_messages(fleet):
    from litellm.anthropic_interface import messages

    response = asyncio.run(
        messages.acreate(
            model=f"anthropic/{MODEL}",
            api_base=fleet["router"],
            api_key=fleet["key"],
            max_tokens=8,
            messages=[{"role": "user", "content": "Say hello."}],
            temperature=0,
        )
    )
    assert response["type"] == "message"
    assert response["content"][0]["type"] == "text" and response["content"][0]["text"]
