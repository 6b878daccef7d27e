"""Unit tests of the balancer's prefix policy: one cost for the prefill still to do and the
node's load, the hot-prefix spill, tie-breaking, and the reason of each choice."""

from __future__ import annotations

import random
from collections import Counter

from llmlb.prefix_keys import CacheReport, request_keys
from llmlb.router.control.fleet import NodeView
from llmlb.router.proxy.balancer import (
    AFFINITY,
    CHARS_PER_TOKEN,
    FALLBACK,
    LOAD,
    LOAD_WEIGHT_TOKENS,
    PREFIX,
    Balancer,
    NoPick,
)
from llmlb.router.proxy.prefix_index import PrefixIndex

MODEL = "org/model"
SYSTEM = "You answer questions about the fleet. " * 100  # ~3,800 characters, ~950 tokens


def views(*specs: tuple[str, int]) -> list[NodeView]:
    return [NodeView(node_id, f"http://{node_id}:1", slots) for node_id, slots in specs]


def conversation(system: str = SYSTEM, turns: int = 2) -> list[tuple[int, int]]:
    messages = [{"role": "system", "content": system}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
    messages.append({"role": "user", "content": "next"})
    return request_keys("/v1/chat/completions", {"model": MODEL, "messages": messages})


def holding(index: PrefixIndex, node_id: str, keys: list[tuple[int, int]]) -> None:
    stored = {MODEL: [key for key, _ in keys]}
    assert index.apply(node_id, CacheReport(f"epoch-{node_id}", 1, True, stored, {})).value == "ok"


def balancer(index: PrefixIndex | None) -> Balancer:
    return Balancer(index=index, rng=random.Random(7))


def test_the_holder_of_the_prefix_wins_at_equal_load():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "b", keys[:-1])  # all but the new user turn
    bal = balancer(index)
    fleet = views(("a", 4), ("b", 4), ("c", 4))
    for _ in range(20):
        assert bal.pick(fleet, model=MODEL, keys=keys).node_id == "b"
    assert bal.reason == PREFIX and bal.matched == keys[-2][1]


def test_load_outweighs_a_prefix_only_when_it_costs_more_than_the_prefill_saved():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "b", keys[:-1])
    bal = balancer(index)
    fleet = views(("a", 16), ("b", 16))
    saved = keys[-2][1] // CHARS_PER_TOKEN  # tokens the holder need not prefill
    busy = saved // LOAD_WEIGHT_TOKENS  # requests in flight worth less than that
    bal.state(fleet[1]).outstanding = busy
    assert bal.pick(fleet, model=MODEL, keys=keys).node_id == "b"
    assert bal.reason == PREFIX
    bal.nodes["b"].outstanding = busy + 2
    assert bal.pick(fleet, model=MODEL, keys=keys).node_id == "a"
    assert bal.reason == LOAD and bal.matched == 0


def test_a_saturated_holder_spills_to_the_least_loaded_node():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "a", keys[:-1])
    bal = balancer(index)
    fleet = views(("a", 2), ("b", 2), ("c", 2))
    bal.state(fleet[0]).outstanding = 2  # every slot taken
    bal.state(fleet[1]).outstanding = 1
    assert bal.pick(fleet, model=MODEL, keys=keys).node_id == "c"
    assert bal.reason == LOAD
    # A node that built its own copy meanwhile is preferred to an empty one.
    holding(index, "b", keys[:1])
    bal.nodes["b"].outstanding = 0
    bal.state(fleet[2]).outstanding = 0
    assert bal.pick(fleet, model=MODEL, keys=keys).node_id == "b"
    assert bal.reason == LOAD and bal.matched == keys[0][1]  # a holds more, but is full
    for node_id in "abc":
        bal.nodes[node_id].outstanding = 2
    assert bal.pick(fleet, model=MODEL, keys=keys) is NoPick.SATURATED


def test_the_reported_load_breaks_ties_but_does_not_outweigh_a_prefix():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "a", keys[:-1])
    holding(index, "b", keys[:-1])
    bal = balancer(index)
    # Equal costs: two random choices, which weigh what the nodes last reported.
    fleet = [NodeView("a", "http://a:1", 8, active=5), NodeView("b", "http://b:1", 8)]
    assert {bal.pick(fleet, model=MODEL, keys=keys).node_id for _ in range(20)} == {"b"}
    # A heartbeat's count comes late (it still counts the turn a just answered): the prefix
    # a holds alone wins over it.
    index.forget("b")
    assert {bal.pick(fleet, model=MODEL, keys=keys).node_id for _ in range(20)} == {"a"}
    assert bal.reason == PREFIX


def test_ties_go_to_affinity_then_to_two_random_choices():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "a", keys[:-1])
    holding(index, "b", keys[:-1])
    bal = balancer(index)
    fleet = views(("a", 4), ("b", 4), ("c", 4))
    bal.remember("u:alice", "b")
    for _ in range(10):
        assert bal.pick(fleet, "u:alice", model=MODEL, keys=keys).node_id == "b"
    assert bal.reason == AFFINITY
    # Affinity to a node that costs more does not win: the holders do.
    bal.remember("u:carol", "c")
    assert bal.pick(fleet, "u:carol", model=MODEL, keys=keys).node_id in ("a", "b")
    assert bal.reason == PREFIX
    picks = Counter(bal.pick(fleet, model=MODEL, keys=keys).node_id for _ in range(200))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 50


def test_no_prefix_anywhere_is_the_two_random_choices_rule():
    index = PrefixIndex()
    holding(index, "a", conversation("another system prompt"))
    bal = balancer(index)
    fleet = views(("a", 4), ("b", 4))
    keys = conversation()
    picks = Counter(bal.pick(fleet, model=MODEL, keys=keys).node_id for _ in range(200))
    assert set(picks) == {"a", "b"}
    assert bal.reason == FALLBACK and bal.matched == 0
    bal.remember("s:42", "a")
    assert bal.pick(fleet, "s:42", model=MODEL, keys=keys).node_id == "a"
    assert bal.reason == AFFINITY


def test_without_an_index_or_keys_the_index_is_not_consulted():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "b", keys)
    fleet = views(("a", 4), ("b", 4))
    p2c = balancer(None)
    assert {p2c.pick(fleet, model=MODEL, keys=keys).node_id for _ in range(50)} == {"a", "b"}
    assert p2c.reason == FALLBACK
    plain = balancer(index)
    assert {plain.pick(fleet).node_id for _ in range(50)} == {"a", "b"}


def test_excluded_and_cooling_holders_are_skipped():
    index = PrefixIndex()
    keys = conversation()
    holding(index, "a", keys)
    bal = balancer(index)
    fleet = views(("a", 4), ("b", 4))
    assert bal.pick(fleet, exclude=["a"], model=MODEL, keys=keys).node_id == "b"
    assert bal.reason == FALLBACK  # the holder was tried already: nothing else holds any
    bal.record_failure(bal.nodes["a"], immediate=True)
    assert bal.pick(fleet, model=MODEL, keys=keys).node_id == "b"
