"""Every field the node honours, with a valid non-default value, on a real node.

``llmlb.node.api.openai_request`` lists what the node honours on ``/v1/chat/completions`` and
``/v1/completions``. Each row below sends one such field with a valid value other than its
default and asserts a 200 and, where one is observable, its effect: a banned token never
appears, a boosted one is all there is, a seed repeats, a stop string ends the answer, ``n``
gives ``n`` choices, ``top_logprobs`` gives that many, a filter that leaves one candidate
makes a hot sampler greedy, a penalty changes a greedy choice.

Greedy effects are read inside one answer (each chosen token against the raw top-1 of its
own ``top_logprobs``), never by comparing two answers' texts: a prompt evaluated after a
reused prefix is split into other row groups, whose kernels move logits by up to 0.2
(``tests/test_engine_reference.py``), so two greedy answers may part at a near tie. Where
two answers must be compared (a seed), both reuse the same cached prompt the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

from tests.node_fixtures import place_model, start_node
from tests.procs import spawner
from tests.router_fixtures import call

MODEL = "local/gemma"
SLOTS = 4
MAX_TOKENS = 8
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
PROMPT = "Paris is the capital of"
MESSAGE = "Tell me about Paris, the capital of France."


class Vocab:
    """Token ids and texts of the Gemma GGUF, read in the test process."""

    def __init__(self, path: str):
        from llmlb.node.inference.llama_native import Model

        self._model = Model(path, gpu=False)

    def tokens(self, text: str) -> list[int]:
        """The ids of ``text`` as a prompt (BOS first)."""
        return self._model.tokenize(text, add_special=True, parse_special=False)

    def id(self, text: str) -> int:
        """The one token ``text`` is (special tokens parsed)."""
        ids = self._model.tokenize(text, add_special=False, parse_special=True)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    def close(self) -> None:
        self._model.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory, gemma_gguf):
    spawn, stop_all = spawner(tmp_path_factory.mktemp("procs"))
    store = tmp_path_factory.mktemp("store")
    place_model(store, MODEL, gemma_gguf, GEMMA_CHAT_TEMPLATE)
    try:
        yield start_node(spawn, "", None, store, "--concurrency", str(SLOTS),
                         "--max-tokens", str(MAX_TOKENS))
    finally:
        stop_all()


@pytest.fixture(scope="module")
def vocab(gemma_gguf):
    words = Vocab(str(gemma_gguf))
    yield words
    words.close()


@dataclass
class Exchange:
    """What a row's check may use: the route, the body sent, its answer, and a way to send
    more (``send(fields)`` merges ``fields`` into the row's body)."""

    route: str
    body: dict
    answer: Any
    send: Callable[[dict], Any]
    vocab: Vocab


def _base(route: str, vocab: Vocab, prompt: str | None = None) -> dict:
    """A body that runs to its ``max_tokens``: the end-of-generation tokens are banned."""
    ends = {str(vocab.id("<eos>")): -100, str(vocab.id("<end_of_turn>")): -100}
    body: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "logit_bias": ends}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": prompt or MESSAGE}]
    else:
        body["prompt"] = prompt or PROMPT
    return body


def _merge(body: dict, fields: dict) -> dict:
    out = {**body, **fields}
    if "logit_bias" in fields:
        out["logit_bias"] = {**body.get("logit_bias", {}), **fields["logit_bias"]}
    return out


def _post(node: str, route: str, body: dict) -> Any:
    """The answer (a dict, or the list of SSE events when streaming); asserts a 200."""
    reply = call(node, "POST", ROUTES[route], body=body, timeout=180)
    assert reply.status == 200, (body, reply.status, reply.body[:2000])
    if not body.get("stream"):
        return reply.json
    lines = reply.body.decode().split("\n\n")
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [orjson.loads(e) for e in events[:-1]]


# -- what a row may assert ----------------------------------------------------------------


def _logprobs(route: str, top: int = 2) -> dict:
    return {"logprobs": True, "top_logprobs": top} if route == "chat" else {"logprobs": top}


def _entries(route: str, choice: dict) -> list[tuple[str, float, dict[str, float]]]:
    """(token, logprob, {alternative: logprob}) per generated token of a choice."""
    logprobs = choice["logprobs"]
    if route == "chat":
        return [(e["token"], e["logprob"], {t["token"]: t["logprob"] for t in e["top_logprobs"]})
                for e in logprobs["content"]]
    return list(zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
                    strict=True))


def _text(route: str, choice: dict) -> str:
    return choice["message"]["content"] if route == "chat" else choice["text"]


def _greedy_choices(x: Exchange) -> list[bool]:
    """Per generated token: whether it is the raw most likely one (logprobs are the model's,
    before any sampler)."""
    entries = _entries(x.route, x.answer["choices"][0])
    assert len(entries) == x.answer["usage"]["completion_tokens"]
    return [lp >= max(top.values()) - 1e-6 for _token, lp, top in entries]


def uses_logprobs(check: Callable[[Exchange], None]) -> Callable[[Exchange], None]:
    """Mark a check that reads logprobs: its row asks for them."""
    check.uses_logprobs = True  # type: ignore[attr-defined]
    return check


@uses_logprobs
def every_token_greedy(x: Exchange) -> None:
    assert all(_greedy_choices(x)), _entries(x.route, x.answer["choices"][0])


@uses_logprobs
def some_token_not_greedy(x: Exchange) -> None:
    assert not all(_greedy_choices(x)), _entries(x.route, x.answer["choices"][0])


def runs_to(tokens: int) -> Callable[[Exchange], None]:
    def check(x: Exchange) -> None:
        assert x.answer["usage"]["completion_tokens"] == tokens
        assert x.answer["choices"][0]["finish_reason"] == "length"

    return check


def n_choices(n: int) -> Callable[[Exchange], None]:
    def check(x: Exchange) -> None:
        choices = x.answer["choices"]
        assert [c["index"] for c in choices] == list(range(n))
        assert all(_text(x.route, c) for c in choices)
        assert x.answer["usage"]["completion_tokens"] == n * MAX_TOKENS

    return check


def top_logprobs(k: int) -> Callable[[Exchange], None]:
    def check(x: Exchange) -> None:
        entries = _entries(x.route, x.answer["choices"][0])
        assert entries and all(len(top) == k for _t, _lp, top in entries), entries

    return check


def seed_repeats(x: Exchange) -> None:
    # The row's answer put this prompt in a slot; the next answers reuse it the same way.
    again, twice = x.send({}), x.send({})
    other = x.send({"seed": x.body["seed"] + 1})
    text = [_text(x.route, a["choices"][0]) for a in (again, twice, other)]
    assert text[0] == text[1], text
    assert text[2] != text[1], text  # the seed is what repeats it


def stop_ends_the_answer(x: Exchange) -> None:
    choice = x.answer["choices"][0]
    stops = x.body["stop"] if isinstance(x.body["stop"], list) else [x.body["stop"]]
    assert choice["finish_reason"] == "stop", choice  # the end tokens are banned
    assert x.answer["usage"]["completion_tokens"] < x.body["max_tokens"]
    assert not any(s in _text(x.route, choice) for s in stops)


@uses_logprobs
def first_token_banned(x: Exchange) -> None:
    # A greedy answer without the ban, then the same with its first token banned.
    free = x.answer["choices"][0]
    first = _entries(x.route, free)[0][0]
    banned = x.send({"logit_bias": {str(x.vocab.id(first)): -100}})
    tokens = [t for t, _lp, _top in _entries(x.route, banned["choices"][0])]
    assert first not in tokens, (first, tokens)


def boosted_token_only(token: str) -> Callable[[Exchange], None]:
    @uses_logprobs
    def check(x: Exchange) -> None:
        boosted = x.send({"logit_bias": {str(x.vocab.id(token)): 100}})
        tokens = [t for t, _lp, _top in _entries(x.route, boosted["choices"][0])]
        assert tokens == [token] * MAX_TOKENS, tokens

    return check


def json_object(x: Exchange) -> None:
    choice = x.answer["choices"][0]
    content = choice["message"]["content"]
    assert content.lstrip().startswith("{"), content
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


SCHEMA = {
    "type": "object",
    "properties": {"capital": {"type": "string", "maxLength": 12}, "big": {"type": "boolean"}},
    "required": ["capital", "big"],
    "additionalProperties": False,
}


def matches_schema(x: Exchange) -> None:
    """The answer is valid JSON under the schema, even with raw control characters (which
    JSON strings may not hold) pushed as hard as logit_bias pushes."""
    jsonschema.validate(json.loads(x.answer["choices"][0]["message"]["content"]), SCHEMA)
    controls = {str(x.vocab.id(c)): 100 for c in ("\n", "\t", "\n\n")}
    pushed = x.send({"logit_bias": controls})["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(pushed), SCHEMA)


def tool_calls(names: set[str] | None, count: int | None = None) -> Callable[[Exchange], None]:
    """The answer calls only ``names`` (``None``: calls nothing), ``count`` calls if given."""

    def check(x: Exchange) -> None:
        choice = x.answer["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        content = choice["message"].get("content") or ""
        assert "<tool_call>" not in content and "</tool_call>" not in content, choice
        if names is None:
            assert not calls and choice["finish_reason"] != "tool_calls", choice
            return
        assert calls and {c["function"]["name"] for c in calls} <= names, choice
        assert choice["finish_reason"] == "tool_calls", choice
        for c in calls:
            assert c["id"].startswith("call_") and c["type"] == "function"
            assert isinstance(json.loads(c["function"]["arguments"]), dict)
        if count is not None:
            assert len(calls) == count, calls

    return check


def usage_chunk(x: Exchange) -> None:
    *chunks, last = x.answer
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == MAX_TOKENS
    assert all(c.get("usage") is None for c in chunks)


def echoed(x: Exchange) -> None:
    choice = x.answer["choices"][0]
    assert choice["text"].startswith(x.body["prompt"]) and len(choice["text"]) > len(PROMPT)


def echoed_with_prompt_logprobs(x: Exchange) -> None:
    echoed(x)
    logprobs = x.answer["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None  # nothing predicts the first prompt token
    generated = x.answer["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == x.answer["usage"]["prompt_tokens"] + generated


def calls_or_text(x: Exchange) -> None:
    message = x.answer["choices"][0]["message"]
    for c in message.get("tool_calls") or []:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    assert message.get("tool_calls") or message["content"], message


def answered(x: Exchange) -> None:
    choice = x.answer["choices"][0]
    assert _text(x.route, choice) and x.answer["usage"]["completion_tokens"] == MAX_TOKENS


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
        "required": ["zone"]}}}
# A call is about 26 tokens here (this GGUF spells <tool_call> in five); with parallel calls
# allowed an answer ends at the first call it would not return (a repeat), so it needs room
# for three.
CALLS_ROOM = 128
TOOLS = {"tools": [WEATHER, TIME], "max_tokens": 48,
         "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
TOKEN_IDS = "<the token ids of PROMPT>"  # replaced by them in the test
HOT = {"temperature": 2.0, "top_k": 0, "min_p": 0.0, "seed": 3}  # every token a candidate
# Greedy, on a prompt the model repeats, with room for the answer to repeat itself.
PENALISED = {"temperature": 0, "max_tokens": 16,
             "prompt": "Paris is the capital of France. Paris is the capital of France. Paris is"}

Check = Callable[[Exchange], None]
# (id, route, fields, check): ``fields`` is merged into the route's base body.
CHAT_ONLY: list[tuple[str, str, dict, Check]] = [
    ("max_completion_tokens", "chat", {"max_completion_tokens": 5}, runs_to(5)),
    ("top_logprobs", "chat", {"logprobs": True, "top_logprobs": 3}, top_logprobs(3)),
    ("logprobs", "chat", {"logprobs": True}, top_logprobs(0)),
    ("json_object", "chat", {"response_format": {"type": "json_object"}, "max_tokens": 40},
     json_object),
    ("json_schema", "chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "strict": True, "schema": SCHEMA}}, "max_tokens": 60}, matches_schema),
    ("format_text", "chat", {"response_format": {"type": "text"}}, answered),
    ("tool_choice_none", "chat", {**TOOLS, "tool_choice": "none"}, tool_calls(None)),
    ("tool_choice_auto", "chat", {**TOOLS, "tool_choice": "auto", "temperature": 0},
     calls_or_text),
    ("tool_choice_required_one", "chat",
     {**TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
     tool_calls({"get_weather", "get_time"}, count=1)),
    ("tool_choice_required", "chat",
     {**TOOLS, "tool_choice": "required", "temperature": 0, "max_tokens": CALLS_ROOM},
     tool_calls({"get_weather", "get_time"})),
    ("tool_choice_named", "chat",
     {**TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
      "max_tokens": CALLS_ROOM},
     tool_calls({"get_time"})),
    ("metadata_and_ids", "chat", {"metadata": {"team": "qa"}, "service_tier": "auto",
                                  "prompt_cache_key": "k1", "safety_identifier": "user-1"},
     answered),
    ("developer_message", "chat", {"messages": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": MESSAGE}]}, answered),
]
COMPLETIONS_ONLY: list[tuple[str, str, dict, Check]] = [
    ("logprobs_3", "completions", {"logprobs": 3}, top_logprobs(3)),
    ("logprobs_0", "completions", {"logprobs": 0}, top_logprobs(0)),
    ("echo", "completions", {"echo": True}, echoed),
    ("echo_logprobs", "completions", {"echo": True, "logprobs": 1},
     echoed_with_prompt_logprobs),
    ("best_of", "completions", {"best_of": 2, "n": 2}, n_choices(2)),
    ("prompts_n", "completions", {"prompt": [PROMPT, "Once upon a time"], "n": 2},
     n_choices(4)),
    ("token_ids", "completions", {"prompt": TOKEN_IDS}, answered),
    ("token_id_lists", "completions", {"prompt": [TOKEN_IDS, TOKEN_IDS]}, n_choices(2)),
]
BOTH: list[tuple[str, dict, Check]] = [
    ("temperature_0", {"temperature": 0, "top_p": 0.5}, every_token_greedy),
    ("temperature_2", HOT, some_token_not_greedy),
    ("top_k", {**HOT, "top_k": 1}, every_token_greedy),
    ("top_p", {**HOT, "top_p": 0.01}, every_token_greedy),
    ("min_p", {**HOT, "min_p": 1.0}, every_token_greedy),
    ("seed", {"temperature": 1.5, "top_k": 0, "min_p": 0.0, "seed": 11}, seed_repeats),
    ("logit_bias_ban", {"temperature": 0}, first_token_banned),
    ("logit_bias_boost", {"temperature": 0}, boosted_token_only(" yes")),
    ("stop", {"temperature": 0, "stop": ".", "max_tokens": 48}, stop_ends_the_answer),
    ("stop_list", {"temperature": 0, "stop": ["no-such-text", ",", "."], "max_tokens": 48},
     stop_ends_the_answer),
    ("n", {"n": SLOTS, "temperature": 1.0}, n_choices(SLOTS)),
    ("max_tokens", {"max_tokens": 3}, runs_to(3)),
    ("stream_usage", {"stream": True, "stream_options": {"include_usage": True}}, usage_chunk),
    ("user", {"user": "user-1234"}, answered),
    # Penalties count the answer's own tokens: on a prompt the model repeats, a greedy
    # choice changes somewhere.
    ("presence_penalty", {**PENALISED, "presence_penalty": 2.0}, some_token_not_greedy),
    ("frequency_penalty", {**PENALISED, "frequency_penalty": 2.0}, some_token_not_greedy),
    ("repeat_penalty", {**PENALISED, "repeat_penalty": 1.5}, some_token_not_greedy),
    ("penalties_sampled", {"temperature": 0.7, "presence_penalty": -0.5,
                           "frequency_penalty": 0.5, "repeat_penalty": 1.1}, answered),
]
ROWS = CHAT_ONLY + COMPLETIONS_ONLY + [
    (name, route, fields, check) for name, fields, check in BOTH for route in ROUTES
]


@pytest.mark.parametrize(("name", "route", "fields", "check"), ROWS,
                         ids=[f"{route}-{name}" for name, route, _f, _c in ROWS])
def test_an_honoured_field_with_a_valid_value_is_200_with_its_effect(
    node, vocab, name, route, fields, check
):
    fields = dict(fields)
    prompt = fields.pop("prompt", None) if route == "chat" else None
    if fields.get("prompt") == TOKEN_IDS:
        fields["prompt"] = vocab.tokens(PROMPT)
    elif fields.get("prompt") == [TOKEN_IDS, TOKEN_IDS]:
        fields["prompt"] = [vocab.tokens(PROMPT), vocab.tokens("Once upon a time")]
    if check is seed_repeats:  # a prompt of the row's own: one slot holds it, reused alike
        prompt = f"{route} {name}: {PROMPT}"
    body = _base(route, vocab, prompt)
    if getattr(check, "uses_logprobs", False):
        body = _merge(body, _logprobs(route))
    body = _merge(body, fields)

    def send(more: dict) -> Any:
        return _post(node, route, _merge(body, more))

    check(Exchange(route, body, send({}), send, vocab))
