"""The cache directory: which prefix keys a node's slots and RAM cache hold, and changes."""

from __future__ import annotations

from llmlb.node.inference.cache_directory import CacheDirectory


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
