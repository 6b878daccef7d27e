"""Chat templates rendered as Hugging Face renders them: Jinja2, sandboxed.

The template receives ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``
and, when the request has them, ``tools``; ``raise_exception`` lets a template refuse a
conversation (a 400 for the client, not a 500).
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Any

from llmlb.errors import ApiError


class TemplateError(ValueError):
    """The chat template could not be compiled or refused the conversation."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except Exception as exc:  # noqa: BLE001 - jinja2's syntax errors
        raise TemplateError(f"the model's chat template does not compile: {exc}") from None


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for ``messages``.

    Raises:
        ApiError: 400 ``invalid_request_error`` when the template refuses the messages.
    """
    try:
        compiled = _compile(template)
        values: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
        }
        if tools:
            values["tools"] = tools
        return compiled.render(**values)
    except TemplateError as exc:
        raise ApiError(400, "invalid_request_error", str(exc), param="messages") from None
    except Exception as exc:  # noqa: BLE001 - a template error caused by these messages
        raise ApiError(
            400,
            "invalid_request_error",
            f"the model's chat template could not render these messages: {exc}",
            param="messages",
        ) from None
