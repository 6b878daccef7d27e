"""Reading the token usage a node reports out of the answer the proxy relays.

Every dialect reports it: OpenAI's ``usage`` (``prompt_tokens``, ``completion_tokens``,
``prompt_tokens_details.cached_tokens``) in a whole answer or, in a stream, the final chunk
of ``stream_options.include_usage``; the Responses API's ``usage`` (``input_tokens``,
``output_tokens``) in ``response.completed``; Anthropic's ``usage`` (``input_tokens``,
``output_tokens``, ``cache_read_input_tokens``) in ``message_start`` and ``message_delta``.
The last report of an answer wins.

When the router asked for the usage chunk itself (:func:`ask_for_usage`), the tap strips it
from what the client sees. Answers without the bytes ``"usage"`` cost a substring search
per chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import orjson

_USAGE = b'"usage"'
_STREAM_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


@dataclass(slots=True)
class Usage:
    """Tokens of one answer."""

    prompt: int = 0
    cached: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt + self.completion


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def read_usage(obj: Any) -> Usage | None:
    """A ``usage`` object of any dialect, or ``None`` if it is not one."""
    if not isinstance(obj, dict):
        return None
    prompt = obj.get("prompt_tokens", obj.get("input_tokens"))
    completion = obj.get("completion_tokens", obj.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    details = obj.get("prompt_tokens_details") or obj.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = obj.get("cache_read_input_tokens")
    return Usage(_int(prompt), _int(cached), _int(completion))


def _find_usage(doc: Any) -> Usage | None:
    """``usage`` at the top of ``doc`` or of its ``response``/``message`` (Responses' and
    Anthropic's stream events)."""
    if not isinstance(doc, dict):
        return None
    if "usage" in doc:
        found = read_usage(doc["usage"])
        if found is not None:
            return found
    for inner in ("response", "message"):
        nested = doc.get(inner)
        if isinstance(nested, dict) and "usage" in nested:
            found = read_usage(nested["usage"])
            if found is not None:
                return found
    return None


def ask_for_usage(path: str, doc: dict[str, Any]) -> bool:
    """Make a streamed chat or completions request ask for the final usage chunk; returns
    ``True`` when ``doc`` was changed (the client did not ask: strip the chunk)."""
    if path not in _STREAM_PATHS or doc.get("stream") is not True:
        return False
    options = doc.get("stream_options")
    if options is None:
        doc["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and options.get("include_usage") is not True:
        if "include_usage" in options and type(options["include_usage"]) is not bool:
            return False  # the node refuses the body: leave it as the client wrote it
        doc["stream_options"] = {**options, "include_usage": True}
        return True
    return False


class UsageTap:
    """Watches an answer's bytes for the node's usage report.

    Args:
        sse: the answer is a server-sent event stream (else one JSON document).
        strip: drop the stream's usage-only chunk (the router asked for it, not the client).
    """

    __slots__ = ("sse", "strip", "usage", "_pending", "_whole")

    def __init__(self, sse: bool, strip: bool = False) -> None:
        self.sse = sse
        self.strip = strip
        self.usage: Usage | None = None
        self._pending = b""
        self._whole: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """Take one chunk of the answer; returns what to relay to the client now (a stream's
        incomplete last event waits for the rest of it)."""
        if not self.sse:
            self._whole.append(chunk)
            return chunk
        data = self._pending + chunk if self._pending else chunk
        # find(), not `in`: bytes' `in` first tries its argument as an int (an exception).
        if not self._pending and (not data or data.endswith(b"\n\n")) and data.find(_USAGE) < 0:
            return data  # whole events with nothing to read (or strip) in them
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        if complete.find(_USAGE) < 0:
            return complete
        kept: list[bytes] = []
        for event in complete.split(b"\n\n")[:-1]:
            if event.find(_USAGE) >= 0 and self._read_event(event):
                continue
            kept.append(event)
        return b"\n\n".join(kept) + b"\n\n" if kept else b""

    def _read_event(self, event: bytes) -> bool:
        """Read the usage out of one event; ``True`` when the event is to be dropped."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                doc = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            found = _find_usage(doc)
            if found is None:
                return False
            self.usage = found
            return self.strip and doc.get("choices") == []
        return False

    def finish(self) -> bytes:
        """The answer ended: read a whole JSON answer's usage; returns what is still to
        relay (a stream's unterminated last event)."""
        if not self.sse:
            whole = b"".join(self._whole)
            self._whole = []
            if whole.rfind(_USAGE) >= 0:  # at the end, where answers put it
                with contextlib.suppress(orjson.JSONDecodeError):
                    self.usage = _find_usage(orjson.loads(whole)) or self.usage
            return b""
        rest, self._pending = self._pending, b""
        return rest
