"""Readers of request fields shared by the three dialects' parsers.

Each reader takes the field's value and its path as the client sent it (``temperature``,
``tools[0].input_schema``, ``input[2].content[1]``), and raises a 400
``invalid_request_error`` naming that path in ``param``. Where a dialect words an error its
own way, the reader takes the message.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from llmlb.errors import ApiError
from llmlb.http import check_depth
from llmlb.node.inference.contract import Generation, Tool
from llmlb.node.inference.sampling import SamplingParams

# OpenAI's limit on the tools of one request.
MAX_TOOLS = 128

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The parameters of a tool that declares none.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

# OpenAI's reasoning efforts. The node's models do not reason: a valid effort (chat's
# ``reasoning_effort``, Responses' ``reasoning.effort``, Anthropic's ``thinking``) is accepted
# and changes nothing; any other value is 400 naming the field, the same in every dialect.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def bad(param: str, message: str, code: str = "invalid_request_error") -> ApiError:
    """A 400 for the request field ``param``."""
    return ApiError(400, code, message, param=param)


def number(
    value: Any, path: str, lo: float, hi: float, *, message: str | None = None
) -> float | None:
    """A number in ``[lo, hi]`` (``None`` when absent or null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(path, message or f"'{path}' must be a number")
    if not lo <= value <= hi:
        raise bad(path, message or f"'{path}' must be between {lo} and {hi}")
    return float(value)


def integer(
    value: Any, path: str, lo: int, hi: int | None = None, *, message: str | None = None
) -> int | None:
    """An integer in ``[lo, hi]`` (``None`` when absent or null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(path, message or f"'{path}' must be an integer")
    if value < lo or (hi is not None and value > hi):
        limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad(path, message or f"'{path}' must be {limit}")
    return value


def boolean(value: Any, path: str, default: bool = False) -> bool:
    """A boolean (``default`` when absent or null)."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(path, f"'{path}' must be a boolean")
    return value


def text(value: Any, path: str) -> str | None:
    """An optional string."""
    if value is not None and not isinstance(value, str):
        raise bad(path, f"'{path}' must be a string")
    return value


def reasoning_effort(value: Any, path: str) -> None:
    """Check a reasoning effort (``None`` or one of :data:`REASONING_EFFORTS`); a model that
    does not reason ignores it."""
    if value is not None and value not in REASONING_EFFORTS:
        raise bad(path, f"'{path}' must be one of {', '.join(REASONING_EFFORTS)}")


def strings(
    value: Any, path: str, limit: int, *, one: bool, kind: str, most: str
) -> tuple[str, ...]:
    """A list of strings (a single string too when ``one``) of at most ``limit``, empty ones
    dropped; ``kind`` and ``most`` are the two errors' messages."""
    if value is None:
        return ()
    if one and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad(path, kind)
    if len(value) > limit:
        raise bad(path, most)
    return tuple(s for s in value if s)


def typed_parts(
    content: Any, path: str, *, noun: str = "a content part object",
    plural: str = "content parts",
) -> list[dict[str, Any]]:  # fmt: skip
    """A content given as a string (one text part) or a list of objects with a ``type``."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(path, f"'{path}' must be a string or a list of {plural}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(f"{path}[{j}]", f"'{path}[{j}]' must be {noun} with a 'type'")
    return content


def content_text(
    content: Any, path: str, kinds: frozenset[str] = frozenset({"text"}), *,
    refusal: bool = False,
) -> str:  # fmt: skip
    """The text of a message's content: a string, or text parts of ``kinds`` joined
    (``refusal`` parts too, their refusal as text, when ``refusal``)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(typed_parts(content, path)):
        at = f"{path}[{j}]"
        if refusal and part["type"] == "refusal":
            texts.append(str(part.get("refusal") or ""))
            continue
        if part["type"] not in kinds:
            kind = part["type"]
            raise bad(at, f"content parts of type {kind!r} are not supported (text only)")
        if not isinstance(part.get("text"), str):
            raise bad(at, f"'{at}.text' must be a string")
        texts.append(part["text"])
    return "".join(texts)


def tool_list(value: Any, path: str = "tools", message: str | None = None) -> list[Any]:
    """The list of tools (at most :data:`MAX_TOOLS`); empty when absent."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad(path, message or f"'{path}' must be a list of at most {MAX_TOOLS} tools")
    if len(value) > MAX_TOOLS:
        raise bad(path, f"'{path}' must be a list of at most {MAX_TOOLS} tools")
    return value


def builtin_tool(where: str, kind: Any, available: str) -> ApiError:
    """The 400 for a built-in (hosted) tool at ``where``, which no node runs; ``available``
    names the tools the dialect accepts."""
    return bad(
        f"{where}.type",
        f"the built-in tool {kind!r} is not available on this node (only {available} are)",
    )


def tool_name(tool: dict[str, Any], where: str) -> str:
    """The ``name`` of the tool object at ``where``: a non-empty string."""
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.name", f"'{where}.name' must be a non-empty string")
    return name


def function_tool(
    name: Any,
    description: Any,
    parameters: Any,
    *,
    at: tuple[str, str, str],
    offered: list[Tool],
) -> Tool:
    """One function tool; ``at`` holds the paths of its name, parameters and description as
    the client sent them (``tools[0].function.name`` …, ``tools[0].input_schema``), and
    ``offered`` the tools read before it (a name is used once)."""
    name_at, params_at, about_at = at
    if not isinstance(name, str) or not _TOOL_NAME.match(name):
        raise bad(name_at, f"'{name_at}' must match ^[A-Za-z0-9_-]{{1,64}}$")
    if any(t.name == name for t in offered):
        raise bad(name_at, f"tool {name!r} is defined twice")
    parameters = parameters or _NO_PARAMETERS
    if not isinstance(parameters, dict):
        raise bad(params_at, f"'{params_at}' must be a JSON schema object")
    description = description or ""
    if not isinstance(description, str):
        raise bad(about_at, f"'{about_at}' must be a string")
    return Tool(name, description, parameters)


def generation(
    *,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    stream: bool,
    top_k: int | None = None,
    grammar_schema: dict[str, Any] | str | None = None,
    user: str | None = None,
) -> Generation:
    """What a Responses or Messages request asks to generate (one choice, no stop strings
    for the engine, no logprobs): the sampler's defaults where a field was absent."""
    return Generation(
        sampling=SamplingParams(
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=40 if top_k is None else top_k,
            given=frozenset(
                name
                for name, value in zip(
                    ("temperature", "top_p", "top_k"), (temperature, top_p, top_k), strict=True
                )
                if value is not None
            ),
        ),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=stream,
        grammar_schema=grammar_schema,
        user=user,
    )


def named_tool(name: Any, offered: list[Tool], path: str) -> str:
    """The name of a tool the request forces, which must be one of ``offered``."""
    if isinstance(name, str) and any(t.name == name for t in offered):
        return name
    raise bad(path, f"'{path}' names {name!r}, which is not in 'tools'")


def call_arguments(arguments: Any, path: str) -> Any:
    """A past call's arguments as the chat template takes them: a JSON text parsed (an empty
    one is ``{}``), anything else as it is."""
    if not isinstance(arguments, str):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        raise bad(path, f"'{path}' is not JSON") from None
    check_depth(value, path)
    return value


def history_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    """A past call in the chat template's shape."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
