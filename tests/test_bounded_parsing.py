"""Unit tests of the parsing bounds: JSON nesting (llmlb.http.json_too_deep, check_depth),
NUL characters (llmlb.http.has_nul) and the peer route's Range header
(llmlb.node.models.peers._parse_range). The same bounds through real processes:
tests/integration/test_bounded_parsing.py."""

from __future__ import annotations

import orjson
import pytest
from llmlb.errors import ApiError
from llmlb.http import MAX_JSON_DEPTH, check_depth, has_nul, json_too_deep
from llmlb.node.models.peers import _parse_range


def arrays(depth: int) -> object:
    return orjson.loads(b"[" * depth + b"]" * depth)


def test_nesting_up_to_the_limit_passes_and_one_more_level_does_not():
    assert MAX_JSON_DEPTH == 64
    assert not json_too_deep(arrays(64)) and json_too_deep(arrays(65))
    assert json_too_deep(arrays(1000))
    mixed = {"a": [{"b": [1, "x", None]}], "c": "s"}  # 4 levels
    assert not json_too_deep(mixed, 4) and json_too_deep(mixed, 3)
    assert not json_too_deep("text") and not json_too_deep(5, 0)
    assert not json_too_deep({}, 1) and json_too_deep({}, 0)


def test_check_depth_names_the_field():
    check_depth(arrays(64))
    with pytest.raises(ApiError) as raised:
        check_depth(arrays(65), "messages[1].tool_calls[0].function.arguments")
    error = raised.value
    assert error.status == 400 and error.code == "invalid_request_error"
    assert error.param == "messages[1].tool_calls[0].function.arguments"
    assert "64 levels" in error.message


def test_nul_anywhere_in_a_string_or_a_key():
    assert not has_nul({"a": ["b", 1, None, {"c": "d"}]})
    assert has_nul({"a": ["b", {"c": "d\x00"}]})
    assert has_nul({"a\x00": 1})
    assert not has_nul("a\\u0000b")  # an escaped backslash: no NUL


@pytest.mark.parametrize(
    "header, span",
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=5-", (5, 20)),
        ("bytes=-3", (17, 20)),
        ("bytes=0-" + "9" * 4300, (0, 20)),  # a last position past the end: the end
        ("bytes=-" + "9" * 4300, (0, 20)),  # a suffix longer than the file: all of it
        ("bytes=" + "0" * 4000 + "5-6", (5, 7)),  # leading zeros of any length
        ("bytes=1-2,4-5", None),  # several ranges: ignored, the whole file
        ("lines=1-2", None),
        ("bytes=x-", None),
    ],
)
def test_ranges(header, span):
    assert _parse_range(header, 20) == span


@pytest.mark.parametrize(
    "header", ["bytes=20-", "bytes=" + "9" * 4300 + "-", "bytes=5-2", "bytes=-0"]
)
def test_unsatisfiable_ranges_are_416_with_the_size(header):
    with pytest.raises(ApiError) as raised:
        _parse_range(header, 20)
    assert raised.value.status == 416 and raised.value.code == "range_not_satisfiable"
    assert raised.value.headers()["Content-Range"] == "bytes */20"
    assert len(raised.value.message) < 200  # a 4,300-digit header is not echoed whole
