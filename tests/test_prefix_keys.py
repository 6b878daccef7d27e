"""The native chain over chat messages keys every message exactly as the Python definition
of an item does (``prefix_keys._chat_item``), on messages of every shape a client sends."""

from __future__ import annotations

import random
import zlib
from typing import Any

from llmlb import prefix_keys
from llmlb.prefix_keys import CHAT, MAX_ITEMS, PrefixKeys, answer_key, request_keys

MODEL = "org/model"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
# Characters of 1-4 UTF-8 bytes and every JSON escape.
ALPHABET = 'ab z"\\/\n\t\r\b\f\x00\x01\x1f\x7f\u00e9\u0800\u20ac\ufffd\U0001f600'


def _reference(messages: list[Any], tools: Any = None) -> PrefixKeys:
    """The chain composed from the Python definitions alone."""
    items = []
    for message in messages[:MAX_ITEMS]:
        if type(message) is not dict:
            break
        items.append(prefix_keys._chat_item(message))
    return prefix_keys._chain(prefix_keys._seed(MODEL, tools), items)


def _text(rng: random.Random) -> str:
    size = rng.choice([0, 1, 5, 127, 128, 255, 256, 257, 258, 300, 2000])
    return "".join(rng.choice(ALPHABET) for _ in range(size))


def _content(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([7, {"text": "x"}, 1.5])
    if kind < 5:
        return _text(rng)
    parts: list[Any] = []
    for _ in range(rng.randrange(4)):
        parts.append(rng.choice([
            _text(rng),
            {"type": "text", "text": _text(rng)},
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "input_audio"},
            {"type": "tool_result", "content": _text(rng)},
            {"text": 3},
            5,
        ]))
    return parts


def _message(rng: random.Random) -> Any:
    if rng.random() < 0.03:
        return rng.choice(["not an object", None, ["a"]])
    message: dict[str, Any] = {
        "role": rng.choice(["system", "developer", "user", "assistant", "tool", None, 3]),
    }
    if rng.random() < 0.9:
        message["content"] = _content(rng)
    shape = rng.randrange(6)
    if shape == 1:
        message["tool_calls"] = []
    elif shape == 2:
        message["tool_calls"] = None
    elif shape == 3:
        message["tool_calls"] = [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": rng.choice(['{"b": 1, "a": [2]}', "not json", {"z": 1}])}}]
    elif shape == 4:
        message["tool_calls"] = "not a list"
    if rng.random() < 0.2:
        message["name"] = "someone"
    return message


def test_native_keys_equal_the_python_definition_on_messages_of_every_shape():
    rng = random.Random(20261207)
    for case in range(400):
        messages = [_message(rng) for _ in range(rng.randrange(12))]
        tools = TOOLS if case % 3 == 0 else None
        body = {"model": MODEL, "messages": messages, **({"tools": tools} if tools else {})}
        assert request_keys(CHAT, body) == _reference(messages, tools), (case, messages)


def test_long_texts_are_keyed_by_their_ends_and_length_counting_characters_not_bytes():
    head, tail = "\U0001f600" * 200, "\u00e9" * 200
    middle_a, middle_b = "x" * 1000, "y" * 1000
    keys_a = request_keys(CHAT, {"model": MODEL, "messages": [
        {"role": "user", "content": head + middle_a + tail}]})
    keys_b = request_keys(CHAT, {"model": MODEL, "messages": [
        {"role": "user", "content": head + middle_b + tail}]})
    keys_c = request_keys(CHAT, {"model": MODEL, "messages": [
        {"role": "user", "content": head + middle_a + "x" + tail}]})
    assert keys_a == keys_b  # the same ends and length: the middle is not read
    assert keys_a != keys_c  # one character longer
    assert keys_a[0][1] > 1400  # the covered length counts the whole text


def test_the_chain_is_zlibs_crc32_over_orjsons_items():
    messages = [{"role": "user", "content": 'say "hi"\n\u00e9'}]
    item = b'["user","say \\"hi\\"\\n\xc3\xa9",[]]'
    assert request_keys(CHAT, {"model": MODEL, "messages": messages}) == [
        (zlib.crc32(item, zlib.crc32(MODEL.encode())), len(item))
    ]


def test_an_answer_key_is_the_next_turns_key_whatever_its_length():
    for answer in ("short", "\u20ac" * 700):
        turn = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        keys = request_keys(CHAT, {"model": MODEL, "messages": turn})
        following = [*turn, {"role": "assistant", "content": answer},
                     {"role": "user", "content": "more"}]
        next_keys = request_keys(CHAT, {"model": MODEL, "messages": following})
        assert answer_key(CHAT, keys, answer) == next_keys[2]
