"""``POST /v1/responses``: OpenAI's Responses API, stateless, on the typed chat contract.

The parser reads a Responses body straight into a
:class:`~llmlb.node.inference.contract.ChatRequest` (``input`` items into the conversation,
``instructions`` into a system message, function ``tools`` and ``tool_choice``, ``text.format``
into the response format, ``max_output_tokens`` into the answer's length), with 400s naming
the fields as the client sent them (``input[2].arguments``, ``tools[0].parameters``). The
engine's answer is rendered as a ``response`` object or, when streaming, as the Responses event
sequence (``response.created`` … ``response.completed``, each with its ``sequence_number``).

The node keeps no state: ``store`` defaults to false, and ``store: true``,
``previous_response_id``, ``conversation`` and ``background`` are 400. Built-in tools
(web search, file search, …) are 400 naming the tool.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import orjson

from llmlb.errors import ContextLengthExceeded
from llmlb.node.api import fields as f
from llmlb.node.api.fields import bad, reasoning_effort
from llmlb.node.inference import contract as ev
from llmlb.node.inference.contract import ChatRequest, FieldPaths, Tool

_STATELESS = "this node keeps no state between requests"
_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text"})
# Item types that carry nothing a stateless text model can use again.
_SKIPPED_ITEMS = frozenset({"reasoning"})
_SUMMARIES = ("auto", "concise", "detailed")
# The Responses names of the fields the engine checks against the model.
PATHS = FieldPaths(
    messages="input",
    max_tokens="max_output_tokens",
    tools="tools",
    tool_schema="tools[{}].parameters",
    response_format="text.format.schema",
)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(slots=True)
class ResponsesRequest:
    """A validated Responses body: the typed chat request to run and what the answer
    echoes."""

    chat: ChatRequest
    stream: bool
    echo: dict[str, Any]


# -- request ---------------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    return f.content_text(content, where, _TEXT_PARTS, refusal=True)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation, in the chat template's shape."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("instructions", "'instructions' must be a string")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if raw is None:
        raise bad("input", "'input' is required")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
        return messages
    if not isinstance(raw, list) or not raw:
        raise bad("input", "'input' must be a string or a non-empty list of input items")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, f"'{where}' must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad(f"{where}.role", f"'{where}.role' must be one of {sorted(_ROLES)}")
            if "content" not in item:
                raise bad(f"{where}.content", f"'{where}' needs a 'content'")
            text = _text_of(item["content"], f"{where}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(_function_call(item, where, len(last["tool_calls"])))
            else:
                call = _function_call(item, where, 0)
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"{where}.call_id", f"'{where}.call_id' must be a string")
            output = _text_of(item.get("output", ""), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "item_reference":
            raise bad(where, f"'item_reference' items need stored items; {_STATELESS}")
        elif kind in _SKIPPED_ITEMS:
            continue
        else:
            raise bad(f"{where}.type", f"input items of type {kind!r} are not supported")
    if not messages:
        raise bad("input", "'input' must hold at least one message")
    return messages


def _function_call(item: dict[str, Any], where: str, number: int) -> dict[str, Any]:
    """A ``function_call`` item as call ``number`` of an assistant message."""
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise bad(f"{where}.{name}", f"'{where}.{name}' must be a string")
    arguments = f.call_arguments(item["arguments"], f"{where}.arguments")
    return f.history_call(item["call_id"] or f"call_{number}", item["name"], arguments)


def _tools(body: dict[str, Any]) -> list[Tool]:
    out: list[Tool] = []
    for i, tool in enumerate(f.tool_list(body.get("tools"), message="'tools' must be a list")):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise bad(where, f"'{where}' must be an object with a 'type'")
        if tool["type"] != "function":
            raise f.builtin_tool(where, tool["type"], "'function' tools")
        name = f.tool_name(tool, where)
        at = (f"{where}.name", f"{where}.parameters", f"{where}.description")
        out.append(
            f.function_tool(
                name, tool.get("description"), tool.get("parameters"), at=at, offered=out
            )
        )
    return out


def _tool_choice(body: dict[str, Any], offered: list[Tool]) -> str:
    choice = body.get("tool_choice")
    named: str | None = None
    if choice is None or choice in ("none", "auto", "required"):
        pass
    elif isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise bad("tool_choice", "'tool_choice.name' must be a string")
        named = choice["name"]
    elif isinstance(choice, dict) and isinstance(choice.get("type"), str):
        raise bad("tool_choice", f"'tool_choice' of type {choice['type']!r} is not supported")
    else:
        raise bad("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or a function")
    if not offered:  # nothing to choose from: as if absent
        return "none"
    if named is not None:
        return f.named_tool(named, offered, "tool_choice")
    return str(choice or "auto")


def _response_format(body: dict[str, Any]) -> dict[str, Any] | str | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad("text", "'text' must be an object")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad("text.format", "'text.format' must be an object with a 'type'")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise bad("text.format.schema", "'text.format.schema' must be an object")
        if fmt.get("name") and not isinstance(fmt["name"], str):
            raise bad("text.format.name", "'text.format.name' must be a string")
        return schema
    raise bad("text.format.type", f"'text.format.type' {kind!r} is not supported")


def _reasoning(body: dict[str, Any]) -> None:
    """Check ``reasoning`` (``effort``, ``summary``): valid values are accepted and change
    nothing, as the node's models do not reason (see ``REASONING_EFFORTS``)."""
    value = body.get("reasoning")
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad("reasoning", "'reasoning' must be an object")
    reasoning_effort(value.get("effort"), "reasoning.effort")
    for name in ("summary", "generate_summary"):
        if value.get(name) not in (None, *_SUMMARIES):
            raise bad(f"reasoning.{name}", f"'reasoning.{name}' must be one of "
                      f"{', '.join(_SUMMARIES)}")


def parse_request(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a Responses body into a typed chat request.

    Raises:
        ApiError: 400 ``invalid_request_error`` naming the field as the client sent it.
    """
    if body.get("store") not in (None, False):
        raise bad("store", f"'store' must be false: {_STATELESS}")
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise bad(name, f"'{name}' needs stored responses: {_STATELESS}")
    if body.get("background") not in (None, False):
        raise bad("background", f"'background' responses need stored state: {_STATELESS}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be a boolean")
    _reasoning(body)
    messages = _messages(body)
    max_tokens = f.integer(
        body.get("max_output_tokens"), "max_output_tokens", 1,
        message="'max_output_tokens' must be a positive integer",
    )  # fmt: skip
    offered = _tools(body)
    tool_choice = _tool_choice(body, offered)
    schema = _response_format(body)
    temperature = f.number(body.get("temperature"), "temperature", 0.0, 2.0)
    top_p = f.number(body.get("top_p"), "top_p", 0.0, 1.0)
    generation = f.generation(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, stream=bool(stream),
        grammar_schema=schema, user=f.text(body.get("user"), "user"),
    )  # fmt: skip
    parallel = f.boolean(body.get("parallel_tool_calls"), "parallel_tool_calls", True)
    chat = ChatRequest(messages, generation, offered, tool_choice, parallel, PATHS)
    echo = {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "model": body.get("model"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "user": body.get("user"),
    }
    return ResponsesRequest(chat=chat, stream=bool(stream), echo=echo)


# -- answer ----------------------------------------------------------------------------


def _usage(usage: ev.Usage, prompt_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + usage.completion_tokens,
    }


class _Shape:
    """The ``response`` object and its output items for one request."""

    def __init__(self, request: ResponsesRequest):
        self.echo = request.echo
        self.id = _new_id("resp")
        self.created = int(time.time())

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        *,
        finish: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        if incomplete is not None and status == "completed":
            status = "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": incomplete,
            "output": output,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "truncation": "disabled",
            "usage": usage,
            **self.echo,
        }

    @staticmethod
    def message(text: str, status: str = "completed", item_id: str | None = None) -> dict:
        content = [] if status == "in_progress" else [_text_part(text)]
        return {
            "type": "message",
            "id": item_id or _new_id("msg"),
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def function_call(
        call_id: str, name: str, arguments: str, status: str = "completed", item_id: str = ""
    ) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": item_id or _new_id("fc"),
            "call_id": call_id or _new_id("call"),
            "name": name,
            "arguments": arguments,
            "status": status,
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _output(shape: _Shape, answer: ev.Choice) -> list[dict[str, Any]]:
    """The output items; when ``max_output_tokens`` cut the answer, the last one (the text
    or the call it ended inside) is ``incomplete``."""
    output = []
    if answer.text or not answer.tool_calls:
        output.append(shape.message(answer.text))
    for call in answer.tool_calls:
        output.append(shape.function_call(call.id, call.name, call.arguments))
    if answer.finish_reason == "length":
        output[-1]["status"] = "incomplete"
    return output


async def create(engine: Any, model_id: str, path: str, body: dict) -> dict | AsyncIterator[bytes]:
    """Run a Responses request: the ``response`` dict, or its SSE events when streaming.

    Raises:
        ApiError: a 4xx for a bad body (before any event), or what the engine raises.
    """
    request = parse_request(body)
    shape = _Shape(request)
    try:
        result = await engine.chat(model_id, path, request.chat)
    except ContextLengthExceeded as exc:
        raise exc.renamed(PATHS.messages, PATHS.max_tokens) from None
    if not isinstance(result, ev.Answer):
        return _stream(shape, result)
    answer = result.choices[0]
    usage = _usage(result.usage, result.usage.prompt_tokens or 0)
    return shape.response("completed", _output(shape, answer), usage, finish=answer.finish_reason)


class _Events:
    """Numbers and serialises the SSE events of one streamed response."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _stream(shape: _Shape, events: AsyncIterator[ev.ChatEvent]) -> AsyncIterator[bytes]:
    """The Responses event sequence of a streamed chat run (its first choice)."""
    emit = _Events()
    output: list[dict[str, Any]] = []  # finished items, by output index
    text: dict[str, Any] | None = None  # the open message item and its text so far
    calls: dict[int, dict[str, Any]] = {}  # open function_call items by call number
    finish = "stop"
    yield emit("response.created", response=shape.response("in_progress", []))
    yield emit("response.in_progress", response=shape.response("in_progress", []))

    def open_text() -> list[bytes]:
        nonlocal text
        item = shape.message("", "in_progress")
        text = {"item": item, "index": len(output), "text": []}
        index = text["index"]
        return [
            emit("response.output_item.added", output_index=index, item=item),
            emit(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def close_text(status: str) -> list[bytes]:
        nonlocal text
        if text is None:
            return []
        item, index, whole = text["item"], text["index"], "".join(text["text"])
        done = {**item, "status": status, "content": [_text_part(whole)]}
        text = None
        output.append(done)
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            emit("response.output_text.done", **ids, text=whole, logprobs=[]),
            emit("response.content_part.done", **ids, part=_text_part(whole)),
            emit("response.output_item.done", output_index=index, item=done),
        ]

    def close_calls(last_status: str = "completed") -> list[bytes]:
        out = []
        for n, call in enumerate(calls.values(), 1):
            item, index = call["item"], call["index"]
            arguments = "".join(call["arguments"])
            status = last_status if n == len(calls) else "completed"
            done = {**item, "arguments": arguments, "status": status}
            output.append(done)
            out.append(
                emit(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=arguments,
                )
            )
            out.append(emit("response.output_item.done", output_index=index, item=done))
        calls.clear()
        return out

    # The engine's events are an async generator: closed with the stream (cancels generation).
    async with contextlib.aclosing(cast(AsyncGenerator[ev.ChatEvent, None], events)):
        async for event in events:
            if getattr(event, "index", 0) != 0:
                continue
            if isinstance(event, ev.TextDelta):
                if not event.text:
                    continue
                if text is None:
                    for chunk in close_calls() + open_text():
                        yield chunk
                assert text is not None
                text["text"].append(event.text)
                yield emit(
                    "response.output_text.delta",
                    item_id=text["item"]["id"],
                    output_index=text["index"],
                    content_index=0,
                    delta=event.text,
                    logprobs=[],
                )
            elif isinstance(event, ev.ToolCallStart):
                for chunk in close_text("completed"):
                    yield chunk
                if event.call in calls:
                    continue  # a repeated header of the same call
                for chunk in close_calls():
                    yield chunk
                item = shape.function_call(event.id, event.name, "", "in_progress")
                index = len(output)
                calls[event.call] = {"item": item, "index": index, "arguments": []}
                yield emit("response.output_item.added", output_index=index, item=item)
            elif isinstance(event, ev.ToolCallArgs):
                call = calls.get(event.call)
                if call is None:
                    continue
                call["arguments"].append(event.arguments)
                yield emit(
                    "response.function_call_arguments.delta",
                    item_id=call["item"]["id"],
                    output_index=call["index"],
                    delta=event.arguments,
                )
            elif isinstance(event, ev.Done):
                finish = event.reason
                if not output and text is None and not calls:
                    for chunk in open_text():
                        yield chunk
                status = "incomplete" if finish == "length" else "completed"
                # the open item is the last one: the text, or the call it was cut inside
                for chunk in close_text(status) + close_calls(status):
                    yield chunk
            elif isinstance(event, ev.Usage):
                usage = _usage(event, event.prompt_tokens or 0)
                final = shape.response("completed", output, usage, finish=finish)
                kind = (
                    "response.completed"
                    if final["status"] == "completed"
                    else ("response.incomplete")
                )
                yield emit(kind, response=final)
            elif isinstance(event, ev.Error):
                error = {
                    "code": event.code or "server_error",
                    "message": event.message or "generation failed",
                }
                yield emit(
                    "response.failed", response=shape.response("failed", output, error=error)
                )
                return


__all__ = ["ResponsesRequest", "create", "parse_request"]
