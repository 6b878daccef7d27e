"""Validation of OpenAI request bodies into what the engine runs.

Every field the OpenAI API reference defines for ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings`` is either honoured or answered with 400
``invalid_request_error`` naming it in ``param``; fields outside the reference are ignored
(clients such as LiteLLM add their own). Wrong types and ranges are 400 with ``param`` too.
The llama.cpp sampling knobs llama-server accepts (``top_k``, ``min_p``,
``repeat_penalty``) are honoured as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmlb.errors import ApiError
from llmlb.http import check_depth
from llmlb.node.inference.sampling import SamplingParams
from llmlb.node.inference.tool_calls import Tool

# OpenAI's limits.
MAX_STOP = 16
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_TOOLS = 128

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# Defined by the API reference but meaningless for a stateless llama.cpp node: accepted when
# they ask for nothing (null / their default), else 400.
_CHAT_UNSUPPORTED = {
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "function_call": (None, "none", "auto"),
    "functions": (None, []),
    "store": (None, False),
    "modalities": (None, ["text"]),
    "verbosity": (None, "medium"),
}


# OpenAI's reasoning efforts. The node's models do not reason: a valid effort (chat's
# ``reasoning_effort``, Responses' ``reasoning.effort``, Anthropic's ``thinking``) is accepted
# and changes nothing; any other value is 400 naming the field, the same in every dialect.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def bad(param: str, message: str, code: str = "invalid_request_error") -> ApiError:
    """A 400 for the request field ``param``."""
    return ApiError(400, code, message, param=param)


def reasoning_effort(value: Any, param: str) -> None:
    """Check a reasoning effort (``None`` or one of :data:`REASONING_EFFORTS`); a model that
    does not reason ignores it.

    Raises:
        ApiError: 400 naming ``param``.
    """
    if value is not None and value not in REASONING_EFFORTS:
        raise bad(param, f"'{param}' must be one of {', '.join(REASONING_EFFORTS)}")


@dataclass(frozen=True, slots=True)
class Generation:
    """What a chat or completion request asks the engine to generate.

    Attributes:
        sampling: sampler settings (token ids in ``logit_bias`` still unchecked, no grammar
            yet: the engine checks the one and adds the other).
        n: choices per prompt.
        max_tokens: tokens per choice (``None``: the node's default cap).
        stop: stop strings.
        stream, include_usage: SSE, and a final usage chunk.
        logprobs: return logprobs; ``top_logprobs`` alternatives per token.
        grammar_schema: ``None``, ``"json_object"``, or a JSON schema (dict) to constrain to.
        user: the end user's id (logged with the request).
    """

    sampling: SamplingParams
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    grammar_schema: dict[str, Any] | str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` body.

    Attributes:
        tools: the function tools offered (empty: none).
        tool_choice: ``none``, ``auto``, ``required``, or the one tool's name that must be
            called.
        parallel_tool_calls: several calls in one answer allowed.
    """

    messages: list[dict[str, Any]]
    generation: Generation
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True

    @property
    def forced_tools(self) -> list[Tool]:
        """The tools the answer must call (empty unless ``required`` or a named tool)."""
        if self.tool_choice == "required":
            return self.tools
        if self.tool_choice in ("auto", "none"):
            return []
        return [t for t in self.tools if t.name == self.tool_choice]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated ``/v1/completions`` body: one or more prompts (text or token ids)."""

    prompts: list[str | list[int]]
    generation: Generation
    echo: bool = False
    suffix: str | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` body."""

    inputs: list[str | list[int]]
    base64: bool = False
    dimensions: int | None = None


# -- field readers ---------------------------------------------------------------------


def number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    """A number in ``[lo, hi]`` (``default`` when absent or null)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(name, f"'{name}' must be a number")
    if not lo <= value <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}")
    return float(value)


def integer(
    body: dict[str, Any], name: str, lo: int, hi: int | None, default: int | None
) -> int | None:
    """An integer in ``[lo, hi]`` (``default`` when absent or null)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"'{name}' must be an integer")
    if value < lo or (hi is not None and value > hi):
        limit = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad(name, f"'{name}' must be {limit}")
    return value


def boolean(body: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean (``default`` when absent or null)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be a boolean")
    return value


def text(body: dict[str, Any], name: str) -> str | None:
    """An optional string."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(name, f"'{name}' must be a string")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop", "'stop' must be a string or a list of strings")
    if len(value) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} strings")
    return tuple(s for s in value if s)


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", "'logit_bias' must map token ids to numbers")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"'logit_bias' key {key!r} is not a token id") from None
        if token < 0:
            raise bad("logit_bias", f"'logit_bias' key {key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise bad("logit_bias", "'logit_bias' values must be numbers between -100 and 100")
        out[token] = float(bias)
    return out


def _sampling(body: dict[str, Any]) -> SamplingParams:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", "'seed' must be an integer")
    return SamplingParams(
        temperature=number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=integer(body, "top_k", 0, None, 40) or 0,
        min_p=number(body, "min_p", 0.0, 1.0, 0.05),
        presence_penalty=number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repeat_penalty=number(body, "repeat_penalty", 0.0, 10.0, 1.0) or 1.0,
        seed=seed,
        logit_bias=_logit_bias(body),
    )


def _max_tokens(body: dict[str, Any], least: int) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = integer(body, name, least, None, None)
        if value is not None:
            return value
    return None


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    return stream, boolean(options, "include_usage")


def _response_format(body: dict[str, Any]) -> dict[str, Any] | str | None:
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("response_format", "'response_format' must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise bad("response_format", "'response_format.json_schema' must be an object")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("response_format", "'response_format.json_schema.schema' must be an object")
        return schema
    raise bad("response_format", f"'response_format.type' {kind!r} is not supported")


def _generation(body: dict[str, Any], *, chat: bool) -> Generation:
    stream, include_usage = _stream(body)
    if chat:
        logprobs = boolean(body, "logprobs")
        top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not logprobs:
            raise bad("top_logprobs", "'top_logprobs' requires 'logprobs': true")
        top_logprobs = top or 0
    else:
        top = integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None)
        logprobs, top_logprobs = top is not None, top or 0
    n = integer(body, "n", 1, MAX_N, 1) or 1
    return Generation(
        sampling=_sampling(body),
        n=n,
        max_tokens=_max_tokens(body, 1 if chat else 0),  # completions: 0 scores the prompt
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar_schema=_response_format(body) if chat else None,
        user=text(body, "user"),
    )


# -- chat ------------------------------------------------------------------------------


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(param, f"'{param}' must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad(where, f"'{where}' must be a content part object with a 'type'")
        if part["type"] != "text":
            kind = part["type"]
            raise bad(where, f"content parts of type {kind!r} are not supported (text only)")
        if not isinstance(part.get("text"), str):
            raise bad(where, f"'{where}.text' must be a string")
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``messages`` of a chat body, each with ``role`` and text ``content``.

    Raises:
        ApiError: 400 naming the faulty message (``messages[i].role`` …).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"'{where}' must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"'{where}.role' must be one of {sorted(CHAT_ROLES)}")
        if role == "developer":
            role = "system"
        has_calls = role == "assistant" and bool(message.get("tool_calls"))
        if "content" not in message or message["content"] is None:
            if not has_calls:
                raise bad(f"{where}.content", f"'{where}' needs a 'content'")
            content = ""
        else:
            content = _content_text(message["content"], f"{where}.content")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise bad(f"{where}.name", f"'{where}.name' must be a string")
        entry = {**message, "role": role, "content": content}
        if has_calls:
            entry["tool_calls"] = _history_calls(message["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id", f"'{where}.tool_call_id' must be a string")
        out.append(entry)
    return out


def _history_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, arguments parsed into objects (as chat
    templates expect them)."""
    if not isinstance(calls, list):
        raise bad(where, f"'{where}' must be a list")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(at, f"'{at}' must be a function call with a 'name'")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = orjson.loads(arguments or "{}")
            except orjson.JSONDecodeError:
                param = f"{at}.function.arguments"
                raise bad(param, f"'{param}' is not JSON") from None
            check_depth(arguments, f"{at}.function.arguments")
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, allowed in _CHAT_UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad(name, f"'{name}' is not supported by this node")
    for name in ("metadata",):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise bad(name, f"'{name}' must be an object")
    for name in ("service_tier", "prompt_cache_key", "safety_identifier"):
        text(body, name)
    reasoning_effort(body.get("reasoning_effort"), "reasoning_effort")


def tools(value: Any) -> list[Tool]:
    """The function tools of a request.

    Raises:
        ApiError: 400 naming the faulty tool (``tools[i]…``).
    """
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise bad("tools", f"'tools' must be a list of at most {MAX_TOOLS} tools")
    out: list[Tool] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad(f"{where}.type", f"'{where}' must be a function tool ('type': 'function')")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad(f"{where}.function", f"'{where}.function' must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise bad(f"{where}.function.name",
                      f"'{where}.function.name' must match ^[A-Za-z0-9_-]{{1,64}}$")
        if any(t.name == name for t in out):
            raise bad(f"{where}.function.name", f"tool {name!r} is defined twice")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise bad(f"{where}.function.parameters",
                      f"'{where}.function.parameters' must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise bad(f"{where}.function.description",
                      f"'{where}.function.description' must be a string")
        out.append(Tool(name, description, parameters))
    return out


def tool_choice(value: Any, offered: list[Tool]) -> str:
    """``none``, ``auto``, ``required`` or the name of the tool that must be called."""
    if value is None:
        return "auto" if offered else "none"
    if value in ("none", "auto", "required"):
        if value == "required" and not offered:
            raise bad("tool_choice", "'tool_choice' is 'required' but no 'tools' are given")
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if not isinstance(function, dict):
            raise bad("tool_choice.function",
                      "'tool_choice.function' must be an object with the tool's 'name'")
        name = function.get("name")
        if isinstance(name, str) and any(t.name == name for t in offered):
            return name
        raise bad("tool_choice", f"'tool_choice' names {name!r}, which is not in 'tools'")
    raise bad("tool_choice",
              "'tool_choice' must be 'none', 'auto', 'required' or a named function")


def chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body.

    Raises:
        ApiError: 400 ``invalid_request_error`` with ``param``.
    """
    _check_unsupported(body)
    offered = tools(body.get("tools"))
    messages = chat_messages(body)
    return ChatRequest(
        messages=messages,
        generation=_generation(body, chat=True),
        tools=offered,
        tool_choice=tool_choice(body.get("tool_choice"), offered),
        parallel_tool_calls=boolean(body, "parallel_tool_calls", True),
    )


# -- completions ---------------------------------------------------------------------


def _token_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def prompts(value: Any, name: str) -> list[str | list[int]]:
    """A string, list of strings, token-id list or list of token-id lists, as a list."""
    if isinstance(value, str):
        return [value]
    if _token_list(value):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_token_list(p) for p in value):
            return list(value)
    raise bad(
        name,
        f"'{name}' must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists",
    )


def completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Validate a ``/v1/completions`` body.

    Raises:
        ApiError: 400 ``invalid_request_error`` with ``param``.
    """
    if "prompt" not in body:
        raise bad("prompt", "'prompt' is required")
    generation = _generation(body, chat=False)
    best_of = integer(body, "best_of", 1, MAX_N, None)
    if best_of is not None and best_of != generation.n:
        raise bad("best_of", "'best_of' other than 'n' is not supported by this node")
    texts = prompts(body["prompt"], "prompt")
    if len(texts) * generation.n > MAX_N:
        raise bad("prompt", f"at most {MAX_N} choices per request (prompts × n)")
    return CompletionRequest(
        prompts=texts,
        generation=generation,
        echo=boolean(body, "echo"),
        suffix=text(body, "suffix") or None,
    )


# -- embeddings ----------------------------------------------------------------------


def embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    """Validate a ``/v1/embeddings`` body.

    Raises:
        ApiError: 400 ``invalid_request_error`` with ``param``.
    """
    if "input" not in body:
        raise bad("input", "'input' is required")
    inputs = prompts(body["input"], "input")
    if any(isinstance(i, str) and not i for i in inputs):
        raise bad("input", "'input' strings must not be empty")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    text(body, "user")
    return EmbeddingRequest(
        inputs=inputs,
        base64=encoding == "base64",
        dimensions=integer(body, "dimensions", 1, None, None),
    )
