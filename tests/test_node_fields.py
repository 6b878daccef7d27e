"""Field paths as the client sent them (llmlb.node.api.fields and the three dialects' parsers,
llmlb.node.inference.prompts): in every dialect a bad tool, a bad number and a bad content
part are 400s naming the field where the client wrote it, never another dialect's path."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from llmlb.errors import ApiError
from llmlb.node.api import anthropic as anthropic_api
from llmlb.node.api import fields, openai_request
from llmlb.node.api import responses as responses_api
from llmlb.node.inference.grammar_budget import GrammarBudget
from llmlb.node.inference.prompts import ModelPrompts

OVER_BUDGET = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 30000}}}


def chat(**extra: Any) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def responses(**extra: Any) -> dict:
    return {"model": "m", "input": "hi", **extra}


def messages(**extra: Any) -> dict:
    return {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            **extra}  # fmt: skip


def parse_chat(body: dict) -> Any:
    return openai_request.chat_request(body)


def parse_responses(body: dict) -> Any:
    return responses_api.parse_request(body).chat


def parse_messages(body: dict) -> Any:
    return anthropic_api.parse_request(body).chat


CASES = [
    # OpenAI chat
    (parse_chat, chat(tools=[{"type": "function", "function": {"name": "w", "parameters": 1}}]),
     "tools[0].function.parameters"),
    (parse_chat, chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
     "tools[0].function.name"),
    (parse_chat, chat(temperature=3), "temperature"),
    (parse_chat, chat(top_p="high"), "top_p"),
    (parse_chat, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages[0].content[0]"),
    (parse_chat, chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
     "messages[0].content[0]"),
    # Responses
    (parse_responses, responses(tools=[{"type": "function", "name": "w", "parameters": 1}]),
     "tools[0].parameters"),
    (parse_responses, responses(tools=[{"type": "function", "name": "bad name!"}]),
     "tools[0].name"),
    (parse_responses, responses(tools=[{"type": "function", "name": "w", "description": 5}]),
     "tools[0].description"),
    (parse_responses, responses(tools=[{"type": "function", "name": "w"},
                                       {"type": "function", "name": "w"}]),
     "tools[1].name"),
    (parse_responses, responses(temperature=3), "temperature"),
    (parse_responses, responses(top_p=-1), "top_p"),
    (parse_responses, responses(input=[{"role": "user", "content": [{"type": "input_image"}]}]),
     "input[0].content[0]"),
    (parse_responses, responses(input=[{"type": "function_call", "call_id": "c", "name": "w",
                                        "arguments": "{not json"}]),
     "input[0].arguments"),
    (parse_responses, responses(input=[{"type": "function_call_output", "call_id": "c",
                                        "output": [{"type": "input_text", "text": 3}]}]),
     "input[0].output[0]"),
    # Anthropic Messages
    (parse_messages, messages(tools=[{"name": "w", "input_schema": 1}]),
     "tools[0].input_schema"),
    (parse_messages, messages(tools=[{"name": "bad name!", "input_schema": {}}]),
     "tools[0].name"),
    (parse_messages, messages(tools=[{"name": "w", "input_schema": {}},
                                     {"name": "w", "input_schema": {}}]),
     "tools[1].name"),
    (parse_messages, messages(temperature=1.5), "temperature"),
    (parse_messages, messages(top_k=-1), "top_k"),
    (parse_messages, messages(messages=[{"role": "user", "content": [{"type": "image"}]}]),
     "messages[0].content[0].type"),
    (parse_messages, messages(messages=[{"role": "user", "content": ["hi"]}]),
     "messages[0].content[0]"),
    (parse_messages, messages(messages=[{"role": "user", "content": [{"type": "text",
                                                                      "text": 1}]}]),
     "messages[0].content[0].text"),
]


@pytest.mark.parametrize(("parse", "body", "param"), CASES)
def test_each_dialect_names_the_field_as_the_client_sent_it(parse, body, param):
    with pytest.raises(ApiError) as caught:
        parse(body)
    assert caught.value.status == 400 and caught.value.code == "invalid_request_error"
    assert caught.value.param == param, caught.value.message
    if parse is not parse_chat:
        assert ".function." not in caught.value.message  # no path of another dialect


def _prompts() -> ModelPrompts:
    """A model's prompts with no model behind them (enough for the tool checks)."""
    prompts = ModelPrompts.__new__(ModelPrompts)
    prompts.template = "{{ tools }}"
    prompts.grammars = SimpleNamespace(budget=GrammarBudget())  # type: ignore[assignment]
    return prompts


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (parse_chat(chat(tools=[{"type": "function", "function": {
            "name": "w", "parameters": OVER_BUDGET}}])), "tools[0].function.parameters"),
        (parse_responses(responses(tools=[{"type": "function", "name": "w",
                                           "parameters": OVER_BUDGET}])),
         "tools[0].parameters"),
        (parse_messages(messages(tools=[{"name": "w", "input_schema": OVER_BUDGET}])),
         "tools[0].input_schema"),
    ],
)
def test_a_tool_over_the_grammar_budget_is_named_as_the_client_sent_it(request_, param):
    with pytest.raises(ApiError) as caught:
        asyncio.run(_prompts()._tooling(request_))  # noqa: SLF001
    assert caught.value.status == 400 and caught.value.param == param
    assert "grammar budget" in caught.value.message


def test_each_dialect_names_its_own_context_fields():
    assert parse_chat(chat()).paths.messages == "messages"
    paths = parse_responses(responses()).paths
    assert (paths.messages, paths.max_tokens) == ("input", "max_output_tokens")
    assert paths.response_format == "text.format.schema"
    assert parse_messages(messages()).paths.schema_of(2) == "tools[2].input_schema"


# -- the shared readers --------------------------------------------------------------------


def test_readers_name_the_path_they_are_given():
    with pytest.raises(ApiError) as caught:
        fields.number("x", "a.b[2].c", 0, 1)
    assert caught.value.param == "a.b[2].c"
    assert caught.value.message == "'a.b[2].c' must be a number"
    with pytest.raises(ApiError) as caught:
        fields.integer(0, "n", 1, message="'n' must be a positive integer")
    assert caught.value.message == "'n' must be a positive integer"
    assert fields.number(None, "t", 0, 1) is None and fields.number(1, "t", 0, 2) == 1.0
    assert fields.boolean(None, "b", True) is True
    assert fields.strings("a", "stop", 4, one=True, kind="k", most="m") == ("a",)
    assert fields.strings(["a", "", "b"], "stop", 4, one=True, kind="k", most="m") == ("a", "b")
    with pytest.raises(ApiError) as caught:
        fields.strings("a", "stop_sequences", 4, one=False, kind="k", most="m")
    assert caught.value.message == "k"
    assert fields.content_text([{"type": "refusal", "refusal": "no"}], "c", refusal=True) == "no"
    assert fields.call_arguments("", "a") == {} and fields.call_arguments({"x": 1}, "a") == {"x": 1}
