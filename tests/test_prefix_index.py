"""Tests of llmlb.router.proxy.prefix_index: reports (epochs, seq, snapshots), guesses from routing,
bounds, forgetting, and the longest-prefix lookup on real request keys."""

from __future__ import annotations

from llmlb.prefix_keys import CacheReport, request_keys
from llmlb.router.proxy.prefix_index import PrefixIndex, ReportResult

MODEL = "org/model"
CHAT = "/v1/chat/completions"
SYSTEM = "You are a careful assistant. " * 40


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def turns(n: int, system: str = SYSTEM) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for i in range(n):
        messages.append({"role": "user", "content": f"question {i}"})
        messages.append({"role": "assistant", "content": f"answer {i}"})
    return messages


def keys_of(messages: list[dict]) -> list[tuple[int, int]]:
    return request_keys(CHAT, {"model": MODEL, "messages": messages})


def report(
    seq: int,
    stored: list[int] = (),
    removed: list[int] = (),
    *,
    epoch: str = "epoch-one",
    snapshot: bool = False,
) -> CacheReport:
    return CacheReport(
        epoch,
        seq,
        snapshot,
        {MODEL: list(stored)} if stored else {},
        {MODEL: list(removed)} if removed else {},
    )


def only(chain: list[tuple[int, int]]) -> list[int]:
    return [key for key, _ in chain]


def test_the_deepest_key_each_node_holds_wins():
    index = PrefixIndex()
    first = keys_of(turns(1))  # system, user, assistant
    second = keys_of(turns(2))  # ... and two more
    assert only(second[:3]) == only(first)  # one chain: the second turn extends the first
    assert index.apply("a", report(1, only(first), snapshot=True)) is ReportResult.OK
    assert index.apply("b", report(1, only(first[:1]), snapshot=True)) is ReportResult.OK
    found = index.longest(MODEL, second, ["a", "b", "c"])
    assert found == {"a": first[-1][1], "b": first[0][1]}
    assert index.longest(MODEL, second, ["b"]) == {"b": first[0][1]}  # candidates only
    assert index.longest("other/model", second, ["a", "b"]) == {}
    assert index.longest(MODEL, keys_of(turns(1, "another system prompt")), ["a", "b"]) == {}


def test_deltas_follow_seq_and_a_snapshot_replaces_everything():
    index = PrefixIndex()
    chain = only(keys_of(turns(2)))
    assert index.apply("a", report(1, chain[:2], snapshot=True)) is ReportResult.OK
    assert index.apply("a", report(2, chain[2:4])) is ReportResult.OK
    assert index.keys_held("a") == 4
    assert index.apply("a", report(2, chain[4:])) is ReportResult.OK  # a retried post
    assert index.keys_held("a") == 4
    assert index.apply("a", report(3, removed=chain[:1])) is ReportResult.OK
    assert index.keys_held("a", MODEL) == 3
    # A snapshot whatever its seq: everything before it is gone.
    assert index.apply("a", report(10, chain[4:], snapshot=True)) is ReportResult.OK
    assert index.keys_held("a") == 1
    assert index.apply("a", report(11, chain[:1])) is ReportResult.OK
    assert index.stats()["a"] == {"keys": 2, "epoch": "epoch-one", "seq": 11}


def test_a_gap_or_a_new_epoch_forgets_the_node_until_its_snapshot():
    index = PrefixIndex()
    chain = keys_of(turns(1))
    index.apply("a", report(1, only(chain), snapshot=True))
    assert index.apply("a", report(3, only(chain))) is ReportResult.RESYNC  # seq 2 was lost
    assert index.longest(MODEL, chain, ["a"]) == {}
    assert index.apply("a", report(4, only(chain))) is ReportResult.RESYNC  # until a snapshot
    assert index.apply("a", report(5, only(chain), snapshot=True)) is ReportResult.OK
    assert index.longest(MODEL, chain, ["a"]) == {"a": chain[-1][1]}
    # The node restarted: its old keys stop attracting at once.
    assert index.apply("a", report(1, [], epoch="epoch-two")) is ReportResult.RESYNC
    assert index.longest(MODEL, chain, ["a"]) == {}
    assert index.stats() == {}


def test_a_delta_from_a_node_never_heard_of_asks_for_a_snapshot_and_keeps_guesses():
    index = PrefixIndex()
    chain = keys_of(turns(1))
    index.learn("a", MODEL, chain)  # a router restarted: it routed there since
    assert index.apply("a", report(7, [1, 2])) is ReportResult.RESYNC
    assert index.longest(MODEL, chain, ["a"]) == {"a": chain[-1][1]}


def test_guesses_attract_at_once_and_expire_unless_a_report_confirms_them():
    clock = Clock()
    index = PrefixIndex(guess_ttl_s=10, clock=clock)
    old = keys_of(turns(1, "old system prompt"))
    index.apply("a", report(1, only(old), snapshot=True))
    chain = keys_of(turns(1))
    index.learn("a", MODEL, chain)
    assert index.longest(MODEL, chain, ["a"]) == {"a": chain[-1][1]}
    index.apply("a", report(2, only(chain[:2])))  # the node kept the first two items only
    clock.now += 11
    assert index.longest(MODEL, chain, ["a"]) == {"a": chain[1][1]}
    assert index.longest(MODEL, old, ["a"]) == {"a": old[-1][1]}  # reported: no expiry


def test_guesses_on_a_node_that_never_reports_stay_and_are_refreshed():
    clock = Clock()
    index = PrefixIndex(max_node_keys=4, clock=clock)
    first, second = keys_of(turns(0, "first")), keys_of(turns(0, "second"))
    index.learn("a", MODEL, first)
    clock.now += 3600
    assert index.longest(MODEL, first, ["a"]) == {"a": first[-1][1]}
    third = keys_of(turns(1, "third"))  # 3 keys: 5 in all, one over the bound
    index.learn("a", MODEL, second)
    index.learn("a", MODEL, first)  # used again: newest now
    index.learn("a", MODEL, third)
    assert index.longest(MODEL, first, ["a"]) == {"a": first[-1][1]}
    assert index.longest(MODEL, second, ["a"]) == {}  # the oldest went
    assert index.keys_held("a") == 4


def test_keys_per_node_and_model_are_bounded_oldest_first():
    index = PrefixIndex(max_node_keys=3)
    index.apply("a", report(1, [1, 2, 3], snapshot=True))
    index.apply("b", report(1, [1], snapshot=True))
    index.apply("a", report(2, [4, 5]))
    assert index.keys_held("a") == 3
    chain = [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]
    assert index.longest(MODEL, chain[:2], ["a", "b"]) == {"b": 10}  # a's 1 and 2 went
    assert index.longest(MODEL, chain, ["a"]) == {"a": 50}


def test_models_per_node_are_bounded():
    index = PrefixIndex(max_node_models=2)
    stored = {f"m{i}": [i + 1] for i in range(5)}
    index.apply("a", CacheReport("epoch-one", 1, True, stored, {}))
    assert index.keys_held("a") == 2


def test_forget_frees_the_node_and_its_bit_for_another():
    index = PrefixIndex()
    chain = keys_of(turns(1))
    index.apply("a", report(1, only(chain), snapshot=True))
    index.apply("b", report(1, only(chain[:1]), snapshot=True))
    index.forget("a")
    index.forget("nobody")
    assert index.longest(MODEL, chain, ["a", "b"]) == {"b": chain[0][1]}
    index.learn("c", MODEL, chain[:2])  # reuses a's bit: nothing of a's shows through
    assert index.longest(MODEL, chain, ["a", "b", "c"]) == {"b": chain[0][1], "c": chain[1][1]}
    index.forget("b")
    index.forget("c")
    assert index.stats() == {}
    assert index._owners == {}  # nothing left behind


def test_removed_applies_before_stored_in_one_delta():
    index = PrefixIndex()
    index.apply("a", report(1, [7], snapshot=True))
    index.apply("a", report(2, stored=[7], removed=[7]))
    assert index.keys_held("a") == 1


def test_an_answer_that_outlived_its_nodes_restart_teaches_nothing():
    index = PrefixIndex()
    chain = keys_of(turns(1))
    index.learn("a", MODEL, chain[:1])
    before = index.generation("a")
    index.forget("a")  # the node re-registered while the request was in flight
    index.learn("a", MODEL, chain, before)
    assert index.longest(MODEL, chain, ["a"]) == {}
    index.learn("a", MODEL, chain, index.generation("a"))
    assert index.longest(MODEL, chain, ["a"]) == {"a": chain[-1][1]}
