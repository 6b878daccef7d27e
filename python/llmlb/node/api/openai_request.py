"""The OpenAI dialect's parser: request bodies into the typed contract the engine runs.

Every field the OpenAI API reference defines for ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings`` is either honoured or answered with 400
``invalid_request_error`` naming it in ``param``; fields outside the reference are ignored
(clients such as LiteLLM add their own). Wrong types and ranges are 400 with ``param`` too.
The llama.cpp sampling knobs llama-server accepts (``top_k``, ``min_p``,
``repeat_penalty``) are honoured as well. The readers are :mod:`llmlb.node.api.fields`; the
result is a :class:`~llmlb.node.inference.contract.ChatRequest`,
:class:`~llmlb.node.inference.contract.CompletionRequest` or
:class:`~llmlb.node.inference.contract.EmbeddingRequest`.
"""

from __future__ import annotations

from typing import Any

from llmlb.node.api import fields as f
from llmlb.node.api.fields import REASONING_EFFORTS, bad, reasoning_effort
from llmlb.node.inference.contract import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Generation,
    Tool,
)
from llmlb.node.inference.sampling import SamplingParams

__all__ = [
    "REASONING_EFFORTS",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "Generation",
    "bad",
    "chat_request",
    "completion_request",
    "embedding_request",
    "reasoning_effort",
]

# OpenAI's limits.
MAX_STOP = 16
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

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


# -- field readers ---------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = f.number(body.get(name), name, lo, hi)
    return default if value is None else value


def _integer(
    body: dict[str, Any], name: str, lo: int, hi: int | None, default: int | None
) -> int | None:
    value = f.integer(body.get(name), name, lo, hi)
    return default if value is None else value


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


# The sampler fields a chat or completions body may set (a model's stored defaults fill in
# the others).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
)


def sampling(body: dict[str, Any]) -> SamplingParams:
    """The sampler settings of a body (OpenAI's names and ranges; llama.cpp's knobs)."""
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", "'seed' must be an integer")
    return SamplingParams(
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        top_k=_integer(body, "top_k", 0, None, 40) or 0,
        min_p=_number(body, "min_p", 0.0, 1.0, 0.05),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0, 1.0) or 1.0,
        seed=seed,
        logit_bias=_logit_bias(body),
        given=frozenset(name for name in SAMPLING_FIELDS if body.get(name) is not None),
    )


def _max_tokens(body: dict[str, Any], least: int) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _integer(body, name, least, None, None)
        if value is not None:
            return value
    return None


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = f.boolean(body.get("stream"), "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    if not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    return stream, f.boolean(options.get("include_usage"), "include_usage")


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
        logprobs = f.boolean(body.get("logprobs"), "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not logprobs:
            raise bad("top_logprobs", "'top_logprobs' requires 'logprobs': true")
        top_logprobs = top or 0
    else:
        top = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None)
        logprobs, top_logprobs = top is not None, top or 0
    n = _integer(body, "n", 1, MAX_N, 1) or 1
    return Generation(
        sampling=sampling(body),
        n=n,
        max_tokens=_max_tokens(body, 1 if chat else 0),  # completions: 0 scores the prompt
        stop=f.strings(
            body.get("stop"), "stop", MAX_STOP, one=True,
            kind="'stop' must be a string or a list of strings",
            most=f"'stop' takes at most {MAX_STOP} strings",
        ),  # fmt: skip
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar_schema=_response_format(body) if chat else None,
        user=f.text(body.get("user"), "user"),
    )


# -- chat ------------------------------------------------------------------------------


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
            content = f.content_text(message["content"], f"{where}.content")
        f.text(message.get("name"), f"{where}.name")
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
        arguments = f.call_arguments(function.get("arguments", "{}"), f"{at}.function.arguments")
        out.append(f.history_call(call.get("id") or f"call_{j}", function["name"], arguments))
    return out


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, allowed in _CHAT_UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad(name, f"'{name}' is not supported by this node")
    for name in ("metadata",):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise bad(name, f"'{name}' must be an object")
    for name in ("service_tier", "prompt_cache_key", "safety_identifier"):
        f.text(body.get(name), name)
    reasoning_effort(body.get("reasoning_effort"), "reasoning_effort")


def tools(value: Any) -> list[Tool]:
    """The function tools of a request.

    Raises:
        ApiError: 400 naming the faulty tool (``tools[i]…``).
    """
    out: list[Tool] = []
    for i, tool in enumerate(f.tool_list(value)):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad(f"{where}.type", f"'{where}' must be a function tool ('type': 'function')")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad(f"{where}.function", f"'{where}.function' must be an object")
        at = (f"{where}.function.name", f"{where}.function.parameters",
              f"{where}.function.description")  # fmt: skip
        out.append(
            f.function_tool(
                function.get("name"), function.get("description"), function.get("parameters"),
                at=at, offered=out,
            )
        )  # fmt: skip
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
        return f.named_tool(function.get("name"), offered, "tool_choice")
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
        parallel_tool_calls=f.boolean(body.get("parallel_tool_calls"), "parallel_tool_calls",
                                      True),
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
    best_of = _integer(body, "best_of", 1, MAX_N, None)
    if best_of is not None and best_of != generation.n:
        raise bad("best_of", "'best_of' other than 'n' is not supported by this node")
    texts = prompts(body["prompt"], "prompt")
    if len(texts) * generation.n > MAX_N:
        raise bad("prompt", f"at most {MAX_N} choices per request (prompts × n)")
    return CompletionRequest(
        prompts=texts,
        generation=generation,
        echo=f.boolean(body.get("echo"), "echo"),
        suffix=f.text(body.get("suffix"), "suffix") or None,
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
    f.text(body.get("user"), "user")
    return EmbeddingRequest(
        inputs=inputs,
        base64=encoding == "base64",
        dimensions=_integer(body, "dimensions", 1, None, None),
    )
