"""The cache directory (which prefix keys a node's slots and RAM cache hold, and changes) and
the prefix keys of any body."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from llmlb.node.inference.cache_directory import CacheDirectory
from llmlb.prefix_keys import request_keys


def test_keys_are_stored_once_and_removed_when_no_holder_is_left():
    changes = []
    directory = CacheDirectory(on_change=lambda: changes.append(1))
    directory.hold(("slot", 0), "m", [1, 2, 3])
    directory.copy(("slot", 0), ("ram", 7))  # saved before the slot is reused
    assert directory.take_changes() == ({"m": [1, 2, 3]}, {})
    directory.hold(("slot", 0), "m", [1, 9])  # the slot now holds another conversation
    assert directory.take_changes() == ({"m": [9]}, {})  # 1-3 still held in RAM
    directory.drop(("ram", 7))  # evicted
    assert directory.take_changes() == ({}, {"m": [2, 3]})
    assert directory.held("m") == {1, 9}
    assert changes


def test_a_key_stored_and_removed_between_reports_is_in_neither():
    directory = CacheDirectory()
    directory.hold(("slot", 0), "m", [5])
    directory.drop(("slot", 0))
    assert directory.take_changes() == ({}, {})
    directory.hold(("slot", 1), "m", [6])
    directory.take_changes()
    directory.drop(("slot", 1))
    directory.add(("slot", 2), "m", [6])  # removed and held again: the router keeps it
    assert directory.take_changes() == ({}, {})


def test_answers_add_keys_and_unloading_drops_a_model():
    directory = CacheDirectory()
    directory.hold(("slot", "a", 0), "a", [1])
    directory.add(("slot", "a", 0), "a", [2])
    directory.hold(("slot", "b", 0), "b", [3])
    assert directory.snapshot(10) == {"a": [1, 2], "b": [3]}
    directory.hold(("slot", "a", 1), "a", [1, 2])
    directory.take_changes()
    directory.drop_model("a")
    assert directory.take_changes() == ({}, {"a": [1, 2]})
    assert directory.snapshot(10) == {"b": [3]}
    assert directory.snapshot(0) == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "model",
        "messages",
        "role",
        "content",
        "tool_calls",
        "function",
        "name",
        "arguments",
        "input",
        "instructions",
        "type",
        "system",
        "prompt",
        "tools",
        "text",
        "output",
    ]
)
bodies = st.recursive(
    st.dictionaries(fields, json_values, max_size=5),
    lambda inner: st.dictionaries(
        fields, inner | json_values | st.lists(inner, max_size=3), max_size=5
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    route=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/responses",
            "/v1/messages",
            "/v1/embeddings",
        ]
    ),
    body=bodies,
)
def test_prefix_keys_of_any_body_never_raise(route, body):
    body.setdefault("model", "m")
    keys = request_keys(route, body)
    assert all(0 <= k <= 0xFFFFFFFF and n >= 0 for k, n in keys)
