"""The router's peer view (:mod:`llmlb.router.control.peers`): who is listed as a peer, which nodes
are seeds while nobody has the model, and the fleet credential."""

from __future__ import annotations

import stat

from llmlb.router.control.peers import NodeModels, fleet_token, peer_plan, weigh_reports

REV = "c" * 40


def _node(
    node_id: str,
    state: str | None = None,
    revision: str = REV,
    uploads: int = 0,
    online=True,
    approved=True,
):
    models = {}
    if state is not None:
        models["m"] = {"id": "m", "state": state, "revision": revision, "uploads": uploads}
    return NodeModels(node_id, f"http://{node_id}:1", online, models, approved=approved)


def _plan(requester, nodes, seeds=1, bad=frozenset()):
    return peer_plan("m", REV, requester, nodes, seeds=seeds, wait_s=30.0, bad=bad)


def test_peers_hold_the_model_ready_at_the_manifests_revision_least_busy_first():
    nodes = [
        _node("busy", "ready", uploads=5),
        _node("idle", "ready", uploads=0),
        _node("old", "ready", revision="a" * 40),
        _node("placed", "ready", revision=None),
        _node("loading", "downloading"),
        _node("gone", "ready", online=False),
        _node("me"),
    ]
    peers, wait = _plan("me", nodes)
    # Ready ones first (least busy first), then the ones downloading it (they trade pieces).
    assert [p.node_id for p in peers] == ["idle", "busy", "loading"] and wait is None
    assert peers[1].uploads == 5 and peers[0].url == "http://idle:1"
    peers, _ = _plan("me", nodes, bad=frozenset({"idle"}))
    assert [p.node_id for p in peers] == ["busy", "loading"]
    peers, _ = _plan("idle", nodes)  # never itself
    assert [p.node_id for p in peers] == ["busy", "loading"]


def test_a_node_downloading_the_model_is_a_peer_so_nobody_waits():
    nodes = [_node("seed", "downloading"), _node("a"), _node("b")]
    for requester in ("a", "b"):
        peers, wait = _plan(requester, nodes)
        assert [p.node_id for p in peers] == ["seed"] and wait is None


def test_a_node_without_an_upload_budget_is_never_listed():
    nodes = [_node("zero", "ready"), _node("slow", "downloading"), _node("ok", "ready")]
    nodes.append(_node("me"))
    nodes[0].models["m"]["serves_peers"] = False
    nodes[1].models["m"]["serves_peers"] = False
    assert [p.node_id for p in _plan("me", nodes)[0]] == ["ok"]


def test_one_seed_goes_to_the_hub_while_the_others_wait_for_it():
    nodes = [_node(f"n{i}") for i in range(5)]
    answers = {n.node_id: _plan(n.node_id, nodes) for n in nodes}
    seeds = [node_id for node_id, (_, wait) in answers.items() if wait is None]
    assert len(seeds) == 1
    assert all(wait == 30.0 for node_id, (_, wait) in answers.items() if node_id not in seeds)
    two = [node_id for node_id in answers if _plan(node_id, nodes, seeds=2)[1] is None]
    assert len(two) == 2 and seeds[0] in two
    # The seed fails (or goes offline): another node takes its place.
    failed = [_node(n.node_id, "failed") if n.node_id == seeds[0] else n for n in nodes]
    others = [n.node_id for n in nodes if n.node_id != seeds[0]]
    assert sum(_plan(node_id, failed)[1] is None for node_id in others) == 1
    offline = [n for n in nodes if n.node_id != seeds[0]]
    assert sum(_plan(node_id, offline)[1] is None for node_id in others) == 1


def test_callers_that_are_no_node_of_the_fleet_never_wait():
    nodes = [_node("a"), _node("b")]
    assert _plan(None, nodes) == ([], None)
    assert _plan("stranger", nodes) == ([], None)


def test_pending_nodes_are_no_peers_and_get_none():
    nodes = [_node("ok", "ready"), _node("new", "ready", approved=False), _node("me")]
    assert [p.node_id for p in _plan("me", nodes)[0]] == ["ok"]
    assert _plan("new", nodes) == ([], None)  # no peer token to fetch with: the hub
    waiting = [_node("a"), _node("b"), _node("new", approved=False)]
    assert _plan("new", waiting) == ([], None)  # never a seed, never waits


def test_one_reporter_only_drops_a_peer_from_its_own_list():
    reports = [("liar", "a")]
    assert weigh_reports(reports, "a") == {"liar"}
    assert weigh_reports(reports, "b") == frozenset()
    assert weigh_reports(reports, None) == frozenset()
    # The same reporter again is still one; a second approved node makes it everyone's.
    assert weigh_reports([*reports, ("liar", "a")], "b") == frozenset()
    both = [*reports, ("liar", "b")]
    assert weigh_reports(both, "c") == {"liar"} and weigh_reports(both, None) == {"liar"}
    assert weigh_reports(both, "c", quorum=3) == frozenset()


def test_the_fleet_token_is_stable_derived_and_its_secret_private(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMLB_FLEET_SECRET", raising=False)
    fleet_token.cache_clear()
    token = fleet_token(tmp_path)
    secret_file = tmp_path / "fleet.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.read_text() not in token
    fleet_token.cache_clear()
    assert fleet_token(tmp_path) == token  # a second worker, or a restart
    monkeypatch.setenv("LLMLB_FLEET_SECRET", "shared-by-every-router")
    fleet_token.cache_clear()
    other = fleet_token(tmp_path / "elsewhere")
    fleet_token.cache_clear()
    assert other != token and fleet_token(tmp_path / "again") == other
    fleet_token.cache_clear()
