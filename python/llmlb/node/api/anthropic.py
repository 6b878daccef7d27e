"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API on
top of the chat engine.

A Messages body is translated into a chat-completions body (``system`` into a system
message; ``text``, ``tool_use`` and ``tool_result`` blocks into chat messages, assistant
``tool_calls`` and ``tool`` messages; ``tools`` with ``input_schema`` into function tools;
``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` into ``auto`` / ``required`` / a named
function / ``none``), run by :meth:`llmlb.node.inference.engine.Engine.chat`, and the answer
reshaped into a ``message`` (``text`` and ``tool_use`` blocks, ``stop_reason``, ``usage``) or, when
streaming, Anthropic's events (``message_start`` … ``message_stop``).

``stop_reason: "stop_sequence"`` needs to know which stop string ended the text, which
chat's ``finish_reason: "stop"`` does not say. So ``stop_sequences`` are not handed to the
engine: the text is matched against them here (:func:`llmlb.node.api.chat_events.chat_events`),
the generation is cancelled at a match, and the answer names the matched string. Its
``output_tokens`` then counts the tokens received before the cut.

Errors are in Anthropic's shape (:mod:`llmlb.anthropic_errors`).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from llmlb import anthropic_errors
from llmlb.node.api import chat_events as ev
from llmlb.node.api.openai_request import bad

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_MAX_STOP_SEQUENCES = 64
# Blocks a text model cannot use and that clients send back with the history.
_SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_THINKING = ("enabled", "disabled", "adaptive")


@dataclass(slots=True)
class MessagesRequest:
    """A validated Messages body: the chat body to run, the stop strings to match here."""

    chat: dict[str, Any]
    stop: tuple[str, ...]
    stream: bool
    model: str


# -- request ---------------------------------------------------------------------------


def _block_text(block: dict, where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise bad(f"{where}.text", f"'{where}.text' must be a string")
    return block["text"]


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(where, f"'{where}' must be a string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad(f"{where}[{j}]", f"'{where}[{j}]' must be a content block with a 'type'")
    return content


def _tool_result_text(block: dict, where: str) -> str:
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


def _system(body: dict) -> list[dict[str, Any]]:
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


def _messages(body: dict) -> list[dict[str, Any]]:
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
                calls.append(_tool_use(block, at))
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
            out.append(
                {"role": "assistant", "content": "".join(texts) or None, "tool_calls": calls}
            )
        elif texts or role == "assistant":
            out.append({"role": role, "content": "".join(texts)})
    return out


def _tool_use(block: dict, where: str) -> dict[str, Any]:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
        raise bad(where, f"'{where}' needs string 'id' and 'name'")
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise bad(f"{where}.input", f"'{where}.input' must be an object")
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": orjson.dumps(arguments).decode()},
    }


def _tools(body: dict) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "'tools' must be a list")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(where, f"'{where}' must be an object")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise bad(
                f"{where}.type",
                f"the built-in tool {kind!r} is not available on this node (only custom "
                "tools with an 'input_schema' are)",
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad(f"{where}.name", f"'{where}.name' must be a non-empty string")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad(f"{where}.input_schema", f"'{where}.input_schema' must be an object")
        function: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(body: dict, chat: dict[str, Any]) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
        raise bad("tool_choice", "'tool_choice' must be an object with a 'type'")
    kind = choice["type"]
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise bad("tool_choice.name", "'tool_choice.name' must name a tool")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise bad("tool_choice.type", "'tool_choice.type' must be auto, any, tool or none")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False
    if "tools" not in chat:  # nothing to choose from: as if absent
        chat.pop("tool_choice", None)
        chat.pop("parallel_tool_calls", None)


def _number(body: dict, name: str, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= hi:
        raise bad(name, f"'{name}' must be a number between 0 and {hi:g}")
    return value


def _thinking(body: dict) -> None:
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


def _stop_sequences(body: dict) -> tuple[str, ...]:
    value = body.get("stop_sequences")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop_sequences", "'stop_sequences' must be a list of strings")
    if len(value) > _MAX_STOP_SEQUENCES:
        raise bad("stop_sequences", f"'stop_sequences' takes at most {_MAX_STOP_SEQUENCES}")
    return tuple(dict.fromkeys(s for s in value if s))


def parse_request(body: dict, *, counting: bool = False) -> MessagesRequest:
    """Validate a Messages body and translate it into a chat body.

    Args:
        body: the request body.
        counting: for ``count_tokens`` (``max_tokens`` is not needed there).

    Raises:
        ApiError: 400 ``invalid_request_error`` naming the field.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required")
    _thinking(body)
    chat: dict[str, Any] = {"model": model, "messages": _messages(body)}
    max_tokens = body.get("max_tokens")
    if not counting:
        if max_tokens is None:
            raise bad("max_tokens", "'max_tokens' is required")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad("max_tokens", "'max_tokens' must be a positive integer")
        chat["max_tokens"] = max_tokens
    for name, hi in (("temperature", 1.0), ("top_p", 1.0)):
        value = _number(body, name, hi)
        if value is not None:
            chat[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise bad("top_k", "'top_k' must be a non-negative integer")
        chat["top_k"] = top_k
    tools = _tools(body)
    if tools:
        chat["tools"] = tools
    _tool_choice(body, chat)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "'stream' must be a boolean")
    return MessagesRequest(chat, _stop_sequences(body), bool(stream), model)


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
        input_tokens = await engine.count_chat_tokens(model_id, path, request.chat)
        return _stream(
            request, message_id, input_tokens, await _events(engine, model_id, path, request)
        )
    if request.stop:
        answer = await ev.collect(await _events(engine, model_id, path, request))
    else:
        answer = ev.chat_answer(await engine.chat(model_id, path, request.chat, as_sse=False))
    input_tokens = answer.usage.prompt_tokens
    if input_tokens is None:
        input_tokens = await engine.count_chat_tokens(model_id, path, request.chat)
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
    usage = _usage(input_tokens, answer.usage.completion_tokens, answer.usage.cached_tokens)
    message = _message(request, message_id, content, usage)
    message["stop_reason"] = _stop_reason(answer.finish_reason)
    message["stop_sequence"] = answer.stop_sequence
    return message


async def count_tokens(engine: Any, model_id: str, path: str, body: dict) -> dict[str, Any]:
    """``/v1/messages/count_tokens``: ``{"input_tokens": n}`` of the rendered prompt."""
    request = parse_request(body, counting=True)
    return {"input_tokens": await engine.count_chat_tokens(model_id, path, request.chat)}


async def _events(
    engine: Any, model_id: str, path: str, request: MessagesRequest
) -> AsyncIterator[ev.ChatEvent]:
    chat = {**request.chat, "stream": True, "stream_options": {"include_usage": True}}
    chunks = await engine.chat(model_id, path, chat, as_sse=False)
    return ev.chat_events(chunks, request.stop)


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
    calls: dict[int, int] = {}  # chat tool index -> block index
    finish = ev.Finish("stop")

    def close() -> list[bytes]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [_sse("content_block_stop", {"index": block})]

    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, ev.TextDelta):
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
                if event.index in calls:
                    continue
                for chunk in close():
                    yield chunk
                block += 1
                open_kind = "tool_use"
                calls[event.index] = block
                tool = {
                    "type": "tool_use",
                    "id": event.id or f"toolu_{secrets.token_hex(12)}",
                    "name": event.name,
                    "input": {},
                }
                yield _sse("content_block_start", {"index": block, "content_block": tool})
            elif isinstance(event, ev.ToolCallDelta):
                if calls.get(event.index) != block or open_kind != "tool_use":
                    continue
                delta = {"type": "input_json_delta", "partial_json": event.arguments}
                yield _sse("content_block_delta", {"index": block, "delta": delta})
            elif isinstance(event, ev.Finish):
                finish = event
                if block < 0:  # an empty answer still has its text block
                    block = 0
                    open_kind = "text"
                    block_start = {"index": 0, "content_block": {"type": "text", "text": ""}}
                    yield _sse("content_block_start", block_start)
                for chunk in close():
                    yield chunk
            elif isinstance(event, ev.Usage):
                delta = {
                    "stop_reason": _stop_reason(finish.reason),
                    "stop_sequence": finish.stop_sequence,
                }
                usage = {"input_tokens": input_tokens, "output_tokens": event.completion_tokens}
                yield _sse("message_delta", {"delta": delta, "usage": usage})
                yield _sse("message_stop", {})
            elif isinstance(event, ev.Failure):
                message = str(event.error.get("message") or "generation failed")
                yield anthropic_errors.sse_error(500, message)
                return


__all__ = ["MessagesRequest", "count_tokens", "create", "parse_request"]
