"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API on
the typed chat contract.

The parser reads a Messages body straight into a
:class:`~llmlb.node.inference.contract.ChatRequest` (``system`` into a system message;
``text``, ``tool_use`` and ``tool_result`` blocks into the conversation; ``tools`` with
``input_schema``; ``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none``), with 400s naming
the fields as the client sent them (``tools[0].input_schema``, ``messages[1].content[0]``).
The engine's answer is rendered as a ``message`` (``text`` and ``tool_use`` blocks,
``stop_reason``, ``usage``) or, when streaming, Anthropic's events (``message_start`` …
``message_stop``).

``stop_reason: "stop_sequence"`` needs to know which stop string ended the text. So
``stop_sequences`` are not handed to the engine: the text is matched against them here
(:func:`llmlb.node.inference.contract.cut_at_stop`), the generation is cancelled at a match,
and the answer names the matched string. Its ``output_tokens`` then counts the tokens
received before the cut.

Errors are in Anthropic's shape (:mod:`llmlb.anthropic_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from llmlb import anthropic_errors
from llmlb.http import check_depth
from llmlb.node.api import fields as f
from llmlb.node.api.fields import bad
from llmlb.node.inference import contract as ev
from llmlb.node.inference.contract import ChatRequest, FieldPaths, Tool

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_MAX_STOP_SEQUENCES = 64
# Blocks a text model cannot use and that clients send back with the history.
_SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_THINKING = ("enabled", "disabled", "adaptive")
# The Messages names of the fields the engine checks against the model.
PATHS = FieldPaths(tool_schema="tools[{}].input_schema")


@dataclass(slots=True)
class MessagesRequest:
    """A validated Messages body: the typed chat request to run, the stop strings to match
    here."""

    chat: ChatRequest
    stop: tuple[str, ...]
    stream: bool
    model: str


# -- request ---------------------------------------------------------------------------


def _block_text(block: dict[str, Any], where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise bad(f"{where}.text", f"'{where}.text' must be a string")
    return str(block["text"])


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    return f.typed_parts(content, where, noun="a content block", plural="content blocks")


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(_blocks(content, f"{where}.content")):
        if part["type"] != "text":
            at = f"{where}.content[{j}]"
            raise bad(at, f"tool_result blocks of type {part['type']!r} are not supported")
        texts.append(_block_text(part, f"{where}.content[{j}]"))
    return "".join(texts)


def _system(body: dict[str, Any]) -> list[dict[str, Any]]:
    system = body.get("system")
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if not isinstance(system, list):
        raise bad("system", "'system' must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(_blocks(system, "system")):
        if block["type"] != "text":
            raise bad(f"system[{j}]", "'system' blocks must be of type 'text'")
        texts.append(_block_text(block, f"system[{j}]"))
    text = "\n\n".join(texts)
    return [{"role": "system", "content": text}] if text else []


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation, in the chat template's shape."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "'messages' must be a non-empty list")
    out = _system(body)
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"'{where}' must be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role", f"'{where}.role' must be 'user' or 'assistant'")
        if "content" not in message:
            raise bad(f"{where}.content", f"'{where}' needs a 'content'")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(_blocks(message["content"], f"{where}.content")):
            at = f"{where}.content[{j}]"
            kind = block["type"]
            if kind == "text":
                texts.append(_block_text(block, at))
            elif kind == "tool_use" and role == "assistant":
                calls.append(_tool_use(block, at, len(calls)))
            elif kind == "tool_result" and role == "user":
                tool_use_id = block.get("tool_use_id")
                if not isinstance(tool_use_id, str) or not tool_use_id:
                    raise bad(f"{at}.tool_use_id", f"'{at}.tool_use_id' must be a string")
                result = _tool_result_text(block, at)
                if block.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": tool_use_id, "content": result})
            elif kind in _SKIPPED_BLOCKS:
                continue
            else:
                raise bad(f"{at}.type", f"{role} content blocks of type {kind!r} are not supported")
        if calls:
            out.append({"role": "assistant", "content": "".join(texts), "tool_calls": calls})
        elif texts or role == "assistant":
            out.append({"role": role, "content": "".join(texts)})
    if not out:
        raise bad("messages", "'messages' must be a non-empty list")
    return out


def _tool_use(block: dict[str, Any], where: str, number: int) -> dict[str, Any]:
    """A ``tool_use`` block as call ``number`` of an assistant message."""
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise bad(where, f"'{where}' needs string 'id' and 'name'")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise bad(f"{where}.input", f"'{where}.input' must be an object")
    check_depth(arguments, f"{where}.input")
    return f.history_call(block["id"] or f"call_{number}", block["name"], arguments)


def _tools(body: dict[str, Any]) -> list[Tool]:
    out: list[Tool] = []
    for i, tool in enumerate(f.tool_list(body.get("tools"), message="'tools' must be a list")):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(where, f"'{where}' must be an object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise f.builtin_tool(where, kind, "custom tools with an 'input_schema'")
        name = f.tool_name(tool, where)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad(f"{where}.input_schema", f"'{where}.input_schema' must be an object")
        description = tool.get("description")
        at = (f"{where}.name", f"{where}.input_schema", f"{where}.description")
        out.append(
            f.function_tool(
                name, description if isinstance(description, str) else None, schema,
                at=at, offered=out,
            )
        )  # fmt: skip
    return out


def _tool_choice(body: dict[str, Any], offered: list[Tool]) -> tuple[str, bool]:
    """The tool choice and whether parallel calls are allowed."""
    choice = body.get("tool_choice")
    if choice is None:
        return ("auto" if offered else "none"), True
    if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
        raise bad("tool_choice", "'tool_choice' must be an object with a 'type'")
    kind = choice["type"]
    named: str | None = None
    if kind == "tool":
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise bad("tool_choice.name", "'tool_choice.name' must name a tool")
        named = choice["name"]
    elif kind not in ("auto", "any", "none"):
        raise bad("tool_choice.type", "'tool_choice.type' must be auto, any, tool or none")
    if not offered:  # nothing to choose from: as if absent
        return "none", True
    parallel = choice.get("disable_parallel_tool_use") is not True
    if named is not None:
        return f.named_tool(named, offered, "tool_choice"), parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def _number(body: dict[str, Any], name: str, hi: float) -> float | None:
    message = f"'{name}' must be a number between 0 and {hi:g}"
    return f.number(body.get(name), name, 0.0, hi, message=message)


def _thinking(body: dict[str, Any]) -> None:
    """Check ``thinking`` (``enabled`` with ``budget_tokens`` ≥ 1024, ``disabled``,
    ``adaptive``): valid values are accepted and change nothing, as the node's models do
    not think (the same rule as ``reasoning_effort`` on chat)."""
    value = body.get("thinking")
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") not in _THINKING:
        raise bad("thinking", f"'thinking' must be an object with 'type' {', '.join(_THINKING)}")
    if value["type"] == "enabled":
        budget = value.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
            raise bad("thinking.budget_tokens",
                      "'thinking.budget_tokens' must be an integer of at least 1024")


def _stop_sequences(body: dict[str, Any]) -> tuple[str, ...]:
    value = f.strings(
        body.get("stop_sequences"), "stop_sequences", _MAX_STOP_SEQUENCES, one=False,
        kind="'stop_sequences' must be a list of strings",
        most=f"'stop_sequences' takes at most {_MAX_STOP_SEQUENCES}",
    )  # fmt: skip
    return tuple(dict.fromkeys(value))


def parse_request(body: dict[str, Any], *, counting: bool = False) -> MessagesRequest:
    """Validate a Messages body into a typed chat request.

    Args:
        body: the request body.
        counting: for ``count_tokens`` (``max_tokens`` is not needed there).

    Raises:
        ApiError: 400 ``invalid_request_error`` naming the field as the client sent it.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required")
    _thinking(body)
    messages = _messages(body)
    max_tokens = None
    if not counting:
        if body.get("max_tokens") is None:
            raise bad("max_tokens", "'max_tokens' is required")
        max_tokens = f.integer(
            body["max_tokens"], "max_tokens", 1, message="'max_tokens' must be a positive integer"
        )
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = f.integer(
        body.get("top_k"), "top_k", 0, message="'top_k' must be a non-negative integer"
    )
    offered = _tools(body)
    tool_choice, parallel = _tool_choice(body, offered)
    metadata = body.get("metadata")
    user = None
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        user = metadata["user_id"]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be a boolean")
    generation = f.generation(
        temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
        stream=bool(stream), user=user,
    )  # fmt: skip
    chat = ChatRequest(messages, generation, offered, tool_choice, parallel, PATHS)
    return MessagesRequest(chat, _stop_sequences(body), bool(stream), model)


def _streamed(request: ChatRequest) -> ChatRequest:
    """``request`` asking for events (to match stop sequences on them)."""
    generation = dataclasses.replace(request.generation, stream=True, include_usage=True)
    return dataclasses.replace(request, generation=generation)


# -- answer ----------------------------------------------------------------------------


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's ``input`` object: its arguments, or for a call ``max_tokens`` cut short the
    members its arguments got to (as Anthropic's SDKs read a cut ``input_json_delta``)."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        value = _cut_object(arguments)
    return value if isinstance(value, dict) else {}


def _cut_object(text: str) -> Any:
    """The value of a JSON text cut short: its open strings and brackets closed, the
    member or item it ended inside dropped (``{}`` when nothing is left)."""
    ends = [len(text)]  # the whole text, then after each ``{``, ``[`` and ``,``, last first
    in_string = escaped = False
    for at, char in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[,":
            ends.insert(1, at + 1)
    for end in ends[:64]:
        head = text[:end].rstrip().rstrip(",").rstrip()
        closers: list[str] = []
        in_string = escaped = False
        for char in head:
            if in_string:
                escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
            elif char == '"':
                in_string = True
            elif char in "{[":
                closers.append("}" if char == "{" else "]")
            elif char in "}]" and closers:
                closers.pop()
        if escaped:
            head = head[:-1]
        candidate = head + ('"' if in_string else "") + "".join(reversed(closers))
        try:
            return orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
    return {}


def _stop_reason(finish: str) -> str:
    return "stop_sequence" if finish == "stop_sequence" else _STOP_REASONS.get(finish, "end_turn")


def _message(
    request: MessagesRequest, message_id: str, content: list[dict[str, Any]], usage: dict
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


def _usage(input_tokens: int, output_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


async def create(engine: Any, model_id: str, path: str, body: dict) -> dict | AsyncIterator[bytes]:
    """Run a Messages request: the ``message`` dict, or its SSE events when streaming.

    Raises:
        ApiError: a 4xx for a bad body (before any event), or what the engine raises.
    """
    request = parse_request(body)
    message_id = f"msg_{secrets.token_hex(12)}"
    if request.stream:
        stream = await engine.chat(model_id, path, request.chat)
        return _stream(request, message_id, stream.prompt_tokens, _cut(stream, request.stop))
    if request.stop:
        stream = await engine.chat(model_id, path, _streamed(request.chat))
        prompt_tokens = stream.prompt_tokens
        result = await ev.collect(_cut(stream, request.stop))
    else:
        result = await engine.chat(model_id, path, request.chat)
        prompt_tokens = result.usage.prompt_tokens
    answer, use = result.choices[0], result.usage
    input_tokens = use.prompt_tokens if use.prompt_tokens is not None else prompt_tokens
    content: list[dict[str, Any]] = []
    if answer.text or not answer.tool_calls:
        content.append({"type": "text", "text": answer.text})
    for call in answer.tool_calls:
        content.append(
            {
                "type": "tool_use",
                "id": call.id or f"toolu_{secrets.token_hex(12)}",
                "name": call.name,
                "input": _tool_input(call.arguments),
            }
        )
    usage = _usage(input_tokens, use.completion_tokens, use.cached_tokens)
    message = _message(request, message_id, content, usage)
    message["stop_reason"] = _stop_reason(answer.finish_reason)
    message["stop_sequence"] = answer.stop_sequence
    return message


async def count_tokens(engine: Any, model_id: str, path: str, body: dict) -> dict[str, Any]:
    """``/v1/messages/count_tokens``: ``{"input_tokens": n}`` of the rendered prompt."""
    request = parse_request(body, counting=True)
    return {"input_tokens": await engine.count_chat_tokens(model_id, path, request.chat)}


def _cut(events: Any, stop: tuple[str, ...]) -> AsyncIterator[ev.ChatEvent]:
    """The run's events, cut at the first of ``stop`` (as they are when none)."""
    return ev.cut_at_stop(events, stop) if stop else events


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


async def _stream(
    request: MessagesRequest,
    message_id: str,
    input_tokens: int,
    events: AsyncIterator[ev.ChatEvent],
) -> AsyncIterator[bytes]:
    """Anthropic's event sequence of a streamed chat run."""
    start = _message(request, message_id, [], _usage(input_tokens, 0))
    yield _sse("message_start", {"message": start})
    block = -1  # index of the open content block (-1: none open yet)
    open_kind: str | None = None
    calls: dict[int, int] = {}  # call number -> block index
    finish = ev.Done("stop")

    def close() -> list[bytes]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [_sse("content_block_stop", {"index": block})]

    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if getattr(event, "index", 0) != 0:
                continue
            if isinstance(event, ev.TextDelta):
                if not event.text:
                    continue
                if open_kind != "text":
                    for chunk in close():
                        yield chunk
                    block += 1
                    open_kind = "text"
                    block_start = {"index": block, "content_block": {"type": "text", "text": ""}}
                    yield _sse("content_block_start", block_start)
                delta = {"type": "text_delta", "text": event.text}
                yield _sse("content_block_delta", {"index": block, "delta": delta})
            elif isinstance(event, ev.ToolCallStart):
                if event.call in calls:
                    continue
                for chunk in close():
                    yield chunk
                block += 1
                open_kind = "tool_use"
                calls[event.call] = block
                tool = {
                    "type": "tool_use",
                    "id": event.id or f"toolu_{secrets.token_hex(12)}",
                    "name": event.name,
                    "input": {},
                }
                yield _sse("content_block_start", {"index": block, "content_block": tool})
            elif isinstance(event, ev.ToolCallArgs):
                if calls.get(event.call) != block or open_kind != "tool_use":
                    continue
                delta = {"type": "input_json_delta", "partial_json": event.arguments}
                yield _sse("content_block_delta", {"index": block, "delta": delta})
            elif isinstance(event, ev.Done):
                finish = event
                if block < 0:  # an empty answer still has its text block
                    block = 0
                    open_kind = "text"
                    block_start = {"index": 0, "content_block": {"type": "text", "text": ""}}
                    yield _sse("content_block_start", block_start)
                for chunk in close():
                    yield chunk
            elif isinstance(event, ev.Usage):
                stop: dict[str, str | None] = {
                    "stop_reason": _stop_reason(finish.reason),
                    "stop_sequence": finish.stop_sequence,
                }
                usage = {"input_tokens": input_tokens, "output_tokens": event.completion_tokens}
                yield _sse("message_delta", {"delta": stop, "usage": usage})
                yield _sse("message_stop", {})
            elif isinstance(event, ev.Error):
                yield anthropic_errors.sse_error(500, event.message or "generation failed")
                return


__all__ = ["MessagesRequest", "count_tokens", "create", "parse_request"]
