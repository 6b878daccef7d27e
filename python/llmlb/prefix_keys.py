"""Prefix keys: what a request's prompt starts with, computed from its body alone.

Router and node compute the same keys without a tokenizer or a chat template: a chain of
CRC-32s over the request's canonical items. For chat dialects the chain starts from the
model and the tools, then takes each message in order (a system prompt, each turn); key
``i`` stands for "the prompt made of the first ``i + 1`` items". For ``/v1/completions``
the items are fixed-size blocks of the prompt's text (or of its token ids). A node that
holds a prompt's cells announces its keys; the router looks up the longest chain a node
holds for a request and routes by it.

After an answer the node also announces :func:`answer_key`: the key of the request's items
followed by the assistant turn it generated, in the shape the client sends it back, so the
conversation's next turn matches it without the node seeing it first.

One definition, used by both sides (``llmlb.router.proxy.prefix_index`` and the node's cache
announcements). Keys are 32-bit: a rare collision makes one request's routing guess wrong,
never an answer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmlb import _model_storage as _native

__all__ = [
    "BLOCK_CHARS",
    "BLOCK_TOKENS",
    "CacheReport",
    "CacheReportError",
    "PrefixKeys",
    "answer_key",
    "request_keys",
]

# Completions prompts are keyed in blocks of this many characters (or token ids).
BLOCK_CHARS = 256
BLOCK_TOKENS = 64
# A message's text is keyed by its length and this many characters at each end.
EDGE_CHARS = 128
# Items past this many are not keyed (a longer history still matches on its first ones).
MAX_ITEMS = 512

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"

PrefixKeys = list[tuple[int, int]]
"""``(key, characters of the prompt it covers)`` for each item, in order."""


def request_keys(route: str, doc: dict[str, Any]) -> PrefixKeys:
    """The prefix keys of request body ``doc`` sent to ``route`` (empty when the route has
    no prompt to reuse, or the body is not one a node would accept)."""
    model = doc.get("model")
    if type(model) is not str:
        return []
    if route == COMPLETIONS:
        return _block_keys(model, doc.get("prompt"))
    if route == CHAT:
        messages = doc.get("messages")
        if type(messages) is not list:
            return []
        seed = _seed(model, doc.get("tools"))
        return _native.chat_prefix_keys(seed, messages, MAX_ITEMS, EDGE_CHARS, _chat_item)
    items = _items(route, doc)
    if items is None:
        return []
    return _chain(_seed(model, doc.get("tools")), items)


def answer_key(
    route: str, keys: PrefixKeys, text: str, calls: list[tuple[str, str]] | None = None
) -> tuple[int, int] | None:
    """The key of a request's prompt followed by the assistant turn ``text`` (and tool
    ``calls`` as ``(name, arguments JSON)``), as the client sends that turn back.

    Args:
        route: the path the request came to.
        keys: :func:`request_keys` of the request (their last key continues the chain).
    """
    if not keys:
        return None
    last, length = keys[-1]
    if route == COMPLETIONS:
        return None  # the next prompt's blocks are keyed as they come (see _block_keys)
    item, covered = _assistant(text, calls or [])
    return zlib.crc32(item, last), length + covered


# -- canonical items ------------------------------------------------------------------


def _seed(model: str, tools: Any) -> int:
    seed = zlib.crc32(model.encode())
    if tools:
        try:
            seed = zlib.crc32(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS), seed)
        except TypeError:
            return seed
    return seed


def _chain(seed: int, items: list[tuple[bytes, int]]) -> PrefixKeys:
    keys: PrefixKeys = []
    key, length = seed, 0
    for item, size in items[:MAX_ITEMS]:
        key = zlib.crc32(item, key)
        length += size
        keys.append((key, length))
    return keys


def _assistant(text: str, calls: list[tuple[str, str]]) -> tuple[bytes, int]:
    return _item("assistant", text, [(name, _compact(arguments)) for name, arguments in calls])


def _item(role: str, text: str, calls: list[tuple[str, str]] | None = None) -> tuple[bytes, int]:
    """One message as the bytes its key is taken over, and the prompt characters it stands
    for. A long text is represented by its length and its two ends: hashing every byte of a
    100 KB history would cost the router more than routing is worth, and two turns that
    differ only in the middle with the same length are a rare, harmless misguess."""
    if len(text) > 2 * EDGE_CHARS:
        shown = f"{text[:EDGE_CHARS]}\x00{len(text)}\x00{text[-EDGE_CHARS:]}"
    else:
        shown = text
    item = orjson.dumps([role, shown, calls or []])
    return item, len(item) + len(text) - len(shown)


def _compact(arguments: Any) -> str:
    """Tool-call arguments in one spelling whether they came as JSON text or an object."""
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    try:
        return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return ""


def _text(content: Any) -> str:
    """The text of a message's content: a string, or its text parts joined."""
    if content is None:
        return ""
    if type(content) is str:
        return content
    if type(content) is not list:
        return ""
    parts = []
    for part in content:
        if type(part) is dict:
            value = part.get("text")
            if type(value) is str:
                parts.append(value)
            elif part.get("type") in ("image_url", "input_image", "image"):
                parts.append("\x00image")
            elif part.get("type") == "tool_result":
                parts.append(_text(part.get("content")))
        elif type(part) is str:
            parts.append(part)
    return "\n".join(parts)


def _items(route: str, doc: dict[str, Any]) -> list[tuple[bytes, int]] | None:
    if route == RESPONSES:
        return _responses_items(doc)
    if route.startswith(MESSAGES):
        return _anthropic_items(doc)
    return None


def _chat_item(message: dict[str, Any]) -> tuple[bytes, int]:
    """The item of one chat message. The chain over a list of messages runs in the native
    extension (about 0.1 µs a message against 1 µs here), which keys the common messages
    itself with the same bytes and calls this for the others; a list ends at its first
    message that is not an object."""
    role = message.get("role")
    if role == "developer":
        role = "system"
    calls = []
    listed = message.get("tool_calls")
    for call in listed if type(listed) is list else ():
        function = call.get("function") if type(call) is dict else None
        if type(function) is dict:
            calls.append((str(function.get("name")), _compact(function.get("arguments"))))
    return _item(str(role), _text(message.get("content")), calls)


def _responses_items(doc: dict[str, Any]) -> list[tuple[bytes, int]] | None:
    items = []
    instructions = doc.get("instructions")
    if type(instructions) is str and instructions:
        items.append(_item("system", instructions))
    source = doc.get("input")
    if type(source) is str:
        return [*items, _item("user", source)]
    if type(source) is not list:
        return None
    pending: list[tuple[str, str]] = []
    for entry in source[:MAX_ITEMS]:
        if type(entry) is not dict:
            return items
        kind = entry.get("type", "message")
        if kind == "function_call":
            pending.append((str(entry.get("name")), _compact(entry.get("arguments"))))
            continue
        if pending:
            items.append(_item("assistant", "", pending))
            pending = []
        if kind == "function_call_output":
            items.append(_item("tool", _text(entry.get("output"))))
        else:
            role = entry.get("role")
            items.append(
                _item("system" if role == "developer" else str(role), _text(entry.get("content")))
            )
    if pending:
        items.append(_item("assistant", "", pending))
    return items


def _anthropic_items(doc: dict[str, Any]) -> list[tuple[bytes, int]] | None:
    messages = doc.get("messages")
    if type(messages) is not list:
        return None
    items = []
    system = _text(doc.get("system"))
    if system:
        items.append(_item("system", system))
    for message in messages[:MAX_ITEMS]:
        if type(message) is not dict:
            return items
        content = message.get("content")
        calls = []
        if type(content) is list:
            for block in content:
                if type(block) is dict and block.get("type") == "tool_use":
                    calls.append((str(block.get("name")), _compact(block.get("input"))))
        items.append(_item(str(message.get("role")), _text(content), calls))
    return items


def _block_keys(model: str, prompt: Any) -> PrefixKeys:
    if type(prompt) is list and len(prompt) == 1:
        prompt = prompt[0]  # one prompt in a list is that prompt
    seed = zlib.crc32(model.encode())
    if type(prompt) is str:
        blocks = [
            (prompt[i : i + BLOCK_CHARS].encode(), BLOCK_CHARS)
            for i in range(0, len(prompt) - BLOCK_CHARS + 1, BLOCK_CHARS)
        ]
        return _chain(seed, blocks)
    if type(prompt) is list and prompt and all(type(t) is int for t in prompt[:BLOCK_TOKENS]):
        blocks = [  # a token stands for about four characters of prompt
            (orjson.dumps(prompt[i : i + BLOCK_TOKENS]), BLOCK_TOKENS * 4)
            for i in range(0, len(prompt) - BLOCK_TOKENS + 1, BLOCK_TOKENS)
        ]
        return _chain(seed, blocks)
    return []


# -- what a node tells the routers ------------------------------------------------------

# Keys one report may carry, and keys a router keeps per node and model.
MAX_REPORT_KEYS = 16_384
MAX_NODE_KEYS = 65_536
_KEY_MAX = 0xFFFFFFFF


class CacheReportError(ValueError):
    """A cache report that breaks the rules below (the router answers 400)."""


@dataclass(frozen=True, slots=True)
class CacheReport:
    """``POST /v0/nodes/{id}/cache``: prefix keys a node's caches gained and lost.

    A node numbers its reports ``seq`` = 1, 2, … within an ``epoch`` (a random id drawn when
    its process starts). A ``snapshot`` lists every key the node holds and replaces what the
    router knew, whatever its ``seq`` (the next delta must then be ``seq + 1``); other
    reports are deltas. A router that sees a new epoch, or a gap in
    ``seq``, forgets the node's keys and answers 409 ``cache_resync`` to a delta, after which
    the node sends a snapshot. Sent within 100 ms of a change to every router of the fleet.

    Attributes:
        epoch: the node process's id (8-64 characters).
        seq: this report's number in the epoch.
        snapshot: ``stored`` is everything the node holds (``removed`` is empty).
        stored, removed: per model id, keys gained and lost.
        node_secret: proves the sender is the node (as in heartbeats).
    """

    epoch: str
    seq: int
    snapshot: bool
    stored: dict[str, list[int]]
    removed: dict[str, list[int]]
    node_secret: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The wire body."""
        body: dict[str, Any] = {
            "epoch": self.epoch,
            "seq": self.seq,
            "snapshot": self.snapshot,
            "stored": self.stored,
            "removed": self.removed,
        }
        if self.node_secret is not None:
            body["node_secret"] = self.node_secret
        return body

    @classmethod
    def parse(cls, body: Any) -> CacheReport:
        """Check a wire body.

        Raises:
            CacheReportError: naming what is wrong.
        """
        if type(body) is not dict:
            raise CacheReportError("the body must be an object")
        epoch, seq, snapshot = body.get("epoch"), body.get("seq"), body.get("snapshot", False)
        if type(epoch) is not str or not 8 <= len(epoch) <= 64:
            raise CacheReportError("epoch must be a string of 8-64 characters")
        if type(seq) is not int or not 1 <= seq <= 1 << 62:
            raise CacheReportError("seq must be a positive integer")
        if type(snapshot) is not bool:
            raise CacheReportError("snapshot must be a boolean")
        total = 0
        parts: list[dict[str, list[int]]] = []
        for name in ("stored", "removed"):
            value = body.get(name, {})
            if type(value) is not dict:
                raise CacheReportError(f"{name} must be an object of model id -> keys")
            for model, keys in value.items():
                if type(keys) is not list or not all(
                    type(k) is int and 0 <= k <= _KEY_MAX for k in keys
                ):
                    raise CacheReportError(f"{name}[{model!r}] must be a list of 32-bit keys")
                total += len(keys)
            parts.append(value)
        if total > MAX_REPORT_KEYS:
            raise CacheReportError(f"a report carries at most {MAX_REPORT_KEYS} keys")
        if snapshot and parts[1]:
            raise CacheReportError("a snapshot removes nothing")
        secret = body.get("node_secret")
        if secret is not None and type(secret) is not str:
            raise CacheReportError("node_secret must be a string")
        return cls(epoch, seq, snapshot, parts[0], parts[1], secret)
