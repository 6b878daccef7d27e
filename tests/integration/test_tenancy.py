"""Per-key limits against a real router (``llmlb router``) on SQLite and on PostgreSQL.

Nodes are the project's mock backend (``bench/router/mock_backend.py``), registered and kept
alive by the test's heartbeats; it reports 12 + 9 tokens for a whole answer and 12 + 19 for
a stream that asks for its usage.
"""

from __future__ import annotations

import http.client
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE
from llmlb.router import db

from tests.integration.test_router_hardening import ADMIN, Beats, Stream, ready, start_mock
from tests.node_fixtures import place_model, start_node
from tests.procs import LLMLB, spawner, wait_until
from tests.router_fixtures import RouterUrl, call, start_router

MODEL = "tenancy/model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    start, stop_all = spawner(tmp_path_factory.mktemp("logs"))
    yield start
    stop_all()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def router(request, module_spawn, tmp_path_factory: pytest.TempPathFactory) -> RouterUrl:
    home = tmp_path_factory.mktemp("home")
    args: tuple[str, ...] = ()
    if request.param == "postgresql":
        args = ("--db", request.getfixturevalue("postgres_server").create_database())
    env = {"LLMLB_HEARTBEAT_INTERVAL_S": "1"}
    return start_router(module_spawn, home, ADMIN, *args, env=env)


@pytest.fixture(scope="module")
def node(router: RouterUrl, module_spawn) -> Iterator[str]:
    mock = start_mock(module_spawn, "mock-tenancy")[1]
    beats = Beats(router)
    beats.register("tenancy-node", f"{mock}/_mock/t/ok", ready(MODEL))
    key = new_key(router)
    wait_until(lambda: chat(router, key).status == 200, timeout=15, message="model routed")
    yield mock
    beats.close()


def new_key(router: str, **limits: object) -> str:
    reply = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", **limits})
    assert reply.status == 201, reply.body
    return reply.json["key"]


def key_id(router: str, name: str) -> dict:
    listed = call(router, "GET", "/v0/keys", ADMIN).json["keys"]
    return next(k for k in listed if k.get("name") == name)


def chat(router: str, key: str, **extra: object):
    return call(router, "POST", "/v1/chat/completions", key, {**CHAT, **extra})


def test_limits_are_stored_shown_and_changed(router):
    body = {
        "scope": "api",
        "name": "team-a",
        "rpm": 60,
        "tpm": 5000,
        "max_parallel": 3,
        "budget_tokens": 100000,
        "budget_period": "month",
        "models": ["Tenancy/*", "org/exact"],
        "priority": "low",
        "expires_at": "2099-01-01T00:00:00Z",
    }
    created = call(router, "POST", "/v0/keys", ADMIN, body)
    assert created.status == 201, created.body
    shown = key_id(router, "team-a")
    expected = {k: v for k, v in body.items() if k not in ("scope", "name")}
    expected["models"] = ["tenancy/*", "org/exact"]
    expected["expires_at"] = "2099-01-01T00:00:00.000Z"
    assert {k: shown[k] for k in expected} == expected
    changed = call(
        router,
        "PATCH",
        f"/v0/keys/{shown['id']}",
        ADMIN,
        {"rpm": 120, "tpm": None, "priority": "high", "name": "team-a2"},
    )
    assert changed.status == 200, changed.body
    shown = key_id(router, "team-a2")
    assert shown["rpm"] == 120 and shown["priority"] == "high" and "tpm" not in shown
    assert call(router, "PATCH", "/v0/keys/key_nope", ADMIN, {"rpm": 1}).status == 404
    assert call(router, "PATCH", f"/v0/keys/{shown['id']}", created.json["key"], {}).status == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rpm": -5}, "rpm"),
        ({"tpm": 10**18}, "tpm"),
        ({"max_parallel": "many"}, "max_parallel"),
        ({"budget_tokens": 10}, "budget_period"),
        ({"models": "org/x"}, "models"),
        ({"priority": "urgent"}, "priority"),
        ({"expires_at": "soon"}, "expires_at"),
        ({"limit": 5}, "limit"),
        ({"scope": "admin"}, "scope"),
    ],
)
def test_bad_limits_are_400_naming_the_field_and_nothing_is_written(router, body, field):
    new_key(router, rpm=10)
    before = call(router, "GET", "/v0/keys", ADMIN).json["keys"]
    if field != "scope":  # a new key has a scope; changing it is what is refused
        created = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "rpm": 10, **body})
        assert created.status == 400, created.body
        error = created.json["error"]
        assert error["param"] == field and field in error["message"]
    target = next(k for k in before if k["scope"] == "api" and "budget_period" not in k)
    patched = call(router, "PATCH", f"/v0/keys/{target['id']}", ADMIN, {"rpm": 7, **body})
    assert patched.status == 400, patched.body
    assert patched.json["error"]["param"] == field
    after = call(router, "GET", "/v0/keys", ADMIN).json["keys"]
    assert after == before  # neither the key nor the change was written


def test_each_limit_refuses_with_its_status_code_and_headers(router, node):
    capped = new_key(router, max_parallel=1, rpm=2)
    first = chat(router, capped)
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert chat(router, capped).status == 200
    refused = chat(router, capped)
    assert refused.status == 429 and refused.json["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    anthropic = call(
        router,
        "POST",
        "/v1/messages",
        capped,
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert anthropic.status == 429 and anthropic.json["type"] == "error"
    assert anthropic.json["error"]["type"] == "rate_limit_error"

    allowlisted = new_key(router, models=["other/*"])
    refused = chat(router, allowlisted)
    assert refused.status == 403 and refused.json["error"]["code"] == "model_not_allowed"

    budget = new_key(router, budget_tokens=30, budget_period="day")
    assert chat(router, budget).status == 200  # 21 tokens
    streamed = call(router, "POST", "/v1/chat/completions", budget, {**CHAT, "stream": True})
    assert streamed.status == 200  # 21 + 31 > 30: this one finishes, the next is refused
    assert b'"usage"' not in streamed.body and streamed.body.endswith(b"data: [DONE]\n\n")
    refused = chat(router, budget)
    assert refused.status == 429 and refused.json["error"]["code"] == "insufficient_quota"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"

    tpm = new_key(router, tpm=100)
    answer = chat(router, tpm)  # reserves the prompt estimate + 20, settles 21
    assert answer.status == 200
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) < 100


def test_max_parallel_admits_again_when_the_running_request_ends(router, node):
    beats = Beats(router)
    try:
        beats.register("drip-node", f"{node}/_mock/d/drip300", ready("tenancy/drip"))
        key = new_key(router, max_parallel=1)
        wait_until(
            lambda: chat(router, key, model="tenancy/drip").status == 200,
            timeout=15,
            message="drip model routed",
        )
        running = Stream(router, key, {"model": "tenancy/drip"})
        try:
            assert running.event() is not None  # in flight now
            refused = chat(router, key, model="tenancy/drip")
            assert refused.status == 429 and refused.json["error"]["code"] == "rate_limit_exceeded"
            assert int(refused.headers["retry-after"]) >= 1
            assert running.rest()[-1] == b"[DONE]"  # the running one finishes
        finally:
            running.close()
        wait_until(
            lambda: chat(router, key, model="tenancy/drip").status == 200,
            timeout=5,
            message="admitted again once the running request ended",
        )
    finally:
        beats.close()


def test_an_expired_key_is_401_and_a_new_expiry_brings_it_back(router, node):
    key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "expiring2"})
    shown = key_id(router, "expiring2")
    assert chat(router, key.json["key"]).status == 200
    past = {"expires_at": "2020-01-01T00:00:00Z"}
    assert call(router, "PATCH", f"/v0/keys/{shown['id']}", ADMIN, past).status == 200
    refused = chat(router, key.json["key"])
    assert refused.status == 401 and refused.json["error"]["code"] == "invalid_api_key"
    cleared = call(router, "PATCH", f"/v0/keys/{shown['id']}", ADMIN, {"expires_at": None})
    assert cleared.status == 200
    assert chat(router, key.json["key"]).status == 200


# -- usage accounting ---------------------------------------------------------------------


def _seen_tokens(reply) -> int:
    """Tokens the client saw in an answer: a whole answer's usage, or a stream's usage chunk."""
    if reply.json is not None:
        return reply.json["usage"]["total_tokens"]
    total = 0
    for line in reply.body.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            total += orjson.loads(line[6:])["usage"]["total_tokens"]
    return total


def test_usage_per_key_equals_what_the_clients_saw(router, node):
    call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "metered"})
    metered = key_id(router, "metered")
    created = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "metered2"})
    key = created.json["key"]
    seen = 0
    for extra in ({}, {"stream": True, "stream_options": {"include_usage": True}}, {}):
        reply = chat(router, key, **extra)
        assert reply.status == 200
        seen += _seen_tokens(reply)
    unasked = chat(router, key, stream=True)  # the router asks; the client sees no usage
    assert unasked.status == 200 and b'"usage"' not in unasked.body
    seen += 31  # the mock's stream usage
    assert chat(router, key, model="no/such-model").status == 404
    own = call(router, "GET", "/v0/usage/self", key)
    assert own.status == 200, own.body
    rows = {row["model"]: row for row in own.json["usage"]}
    assert rows[MODEL]["total_tokens"] == seen and rows[MODEL]["requests"] == 4
    assert rows[MODEL]["prompt_tokens"] == 48 and rows[MODEL]["errors"] == 0
    assert rows["no/such-model"]["errors"] == 1
    me = own.json["key"]
    admin = call(router, "GET", f"/v0/usage?key={me}&group_by=key,node", ADMIN)
    by_node = {r["node"]: r for r in admin.json["usage"]}
    assert by_node["tenancy-node"]["total_tokens"] == seen and by_node[""]["errors"] == 1
    assert {r["key"] for r in admin.json["usage"]} == {me}
    csv = call(router, "GET", f"/v0/usage?key={me}&group_by=model&format=csv", ADMIN)
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.body.decode().splitlines()
    assert lines[0].startswith("model,requests,prompt_tokens")
    assert f"{MODEL},4,48," in csv.body.decode()
    # A key cannot read another key's usage.
    other = call(router, "GET", f"/v0/usage/self?key={metered['id']}", key)
    assert other.status == 403 and other.json["error"]["param"] == "key"
    assert call(router, "GET", "/v0/usage", key).status == 403
    bad = call(router, "GET", "/v0/usage?group_by=colour", ADMIN)
    assert bad.status == 400 and bad.json["error"]["param"] == "group_by"
    bad = call(router, "GET", "/v0/usage?from=yesterday", ADMIN)
    assert bad.status == 400 and bad.json["error"]["param"] == "from"


def test_usage_survives_a_sigkill_but_the_last_second(module_spawn, tmp_path, node):
    """A router of its own on SQLite: usage reaches the file within about a second of each
    request, so a SIGKILL loses at most that."""
    home = tmp_path / "home"
    home.mkdir()
    own = start_router(module_spawn, home, ADMIN, env={"LLMLB_HEARTBEAT_INTERVAL_S": "1"})
    beats = Beats(own)
    try:
        beats.register("kill-node", f"{node}/_mock/k/ok", ready(MODEL))
        key = new_key(own)
        wait_until(lambda: chat(own, key).status == 200, timeout=15, message="routed")
        for _ in range(5):
            assert chat(own, key).status == 200
        database = sqlite3.connect(home / "lb.db")

        def stored() -> int:
            row = database.execute("SELECT SUM(requests) FROM key_usage").fetchone()
            return int(row[0] or 0)

        wait_until(lambda: stored() >= 6, timeout=3, message="usage written within a second")
        beats.close()  # no heartbeat to a dead router
        own.proc.kill()
        assert stored() == 6
        database.close()
    finally:
        beats.close()


# -- several routers on one PostgreSQL ----------------------------------------------------


def _two_routers(spawn, tmp_path: Path, postgres_url: str) -> list[RouterUrl]:
    """Two routers on one PostgreSQL database, each with its own home."""
    routers = []
    for index in range(2):
        home = tmp_path / f"home{index}"
        home.mkdir()
        routers.append(
            start_router(
                spawn, home, ADMIN, "--db", postgres_url, env={"LLMLB_HEARTBEAT_INTERVAL_S": "1"}
            )
        )
    return routers


def test_rpm_holds_across_two_routers(spawn, tmp_path, postgres_url):
    """Two routers, one database, 8 client threads: the fleet admits exactly the key's rpm
    (leases of the quota; the overshoot stated in llmlb.router.control.quota is clock skew
    only, none on one machine), and both routers admit part of it."""
    mock = start_mock(spawn, "mock-fleet")[1]
    routers = _two_routers(spawn, tmp_path, postgres_url)
    beats = [Beats(router) for router in routers]
    try:
        beats[0].register("fleet-node", f"{mock}/_mock/f/ok", ready(MODEL))
        warm = new_key(routers[0])
        for router in routers:
            wait_until(lambda r=router: chat(r, warm).status == 200, timeout=15, message="routed")
        limited = new_key(routers[0], rpm=40)
        wait_until(lambda: chat(routers[1], limited).status == 200, timeout=10, message="key")
        results: list[tuple[int, int]] = []
        lock = threading.Lock()
        deadline = time.monotonic() + 4.0  # well inside one sliding minute

        def client(index: int) -> None:
            while time.monotonic() < deadline:
                status = chat(routers[index % 2], limited).status
                with lock:
                    results.append((index % 2, status))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        accepted = [router for router, status in results if status == 200]
        assert {status for _, status in results} <= {200, 429}
        assert len(accepted) == 40 - 1  # the one sent before the burst counts too
        assert set(accepted) == {0, 1}
    finally:
        for beat in beats:
            beat.close()


def test_max_parallel_holds_across_two_routers(spawn, tmp_path, postgres_url):
    """Two routers, one database: with max_parallel requests of a key running through router
    0, router 1 refuses the next with 429 ``rate_limit_exceeded`` (``Retry-After`` 1 s: the
    slots are leased fleet-wide, llmlb.router.control.quota); once they ended, router 0 gives
    its idle slots back to router 1, which wants them, within a couple of seconds. Routers
    that shut down give back every slot."""
    mock = start_mock(spawn, "mock-parallel")[1]
    routers = _two_routers(spawn, tmp_path, postgres_url)
    beats = Beats(routers[0])
    try:
        beats.register("parallel-drip", f"{mock}/_mock/p/drip600", ready("tenancy/drip"))
        warm = new_key(routers[0])
        for router in routers:
            wait_until(
                lambda r=router: chat(r, warm, model="tenancy/drip").status == 200,
                timeout=15,
                message="routed",
            )
        limited = new_key(routers[0], max_parallel=2, name="parallel2")
        wait_until(
            lambda: chat(routers[1], limited, model="tenancy/drip").status == 200,
            timeout=10,
            message="the key on router 1",
        )
        limited_id = key_id(routers[0], "parallel2")["id"]
        running: list[Stream] = []

        def start_one() -> bool:
            stream = Stream(routers[0], limited, {"model": "tenancy/drip"})
            if stream.resp.status != 200:
                stream.close()
                return False
            assert stream.event() is not None  # in flight now
            running.append(stream)
            return len(running) == 2

        # router 1's slot goes back once idle (or wanted): router 0 can take both
        wait_until(start_one, timeout=10, interval=0.1, message="both slots on router 0")
        try:
            for router in routers:  # both slots are taken: refused on either router
                refused = chat(router, limited, model="tenancy/drip")
                assert refused.status == 429, refused.body
                assert refused.json["error"]["code"] == "rate_limit_exceeded"
                assert int(refused.headers["retry-after"]) == 1
            for stream in running:
                assert stream.rest()[-1] == b"[DONE]"  # the running ones finish
        finally:
            for stream in running:
                stream.close()
        wait_until(
            lambda: chat(routers[1], limited, model="tenancy/drip").status == 200,
            timeout=5,
            interval=0.1,
            message="router 1 admits once router 0's requests ended",
        )
    finally:
        beats.close()
    # A router that shuts down gives back its slots.
    assert _leased_after_shutdown(routers, postgres_url, "parallel_leases", limited_id) == 0


def _leased_after_shutdown(
    routers: list[RouterUrl], postgres_url: str, table: str, key_id: str
) -> int:
    """Stop every router (each must exit cleanly), then what ``table`` still records as
    leased to ``key_id``."""
    for router in routers:
        assert router.proc.stop() == 0
    conn = db.open_database(postgres_url)
    try:
        row = conn.execute(
            f"SELECT SUM(amount) FROM {table} WHERE key_id = ?", (key_id,)
        ).fetchone()
    finally:
        conn.close()
    return int(row[0] or 0)


def _reserves(body: dict) -> int:
    """What the router reserves for a chat body (llmlb.router.proxy.admission)."""
    return len(orjson.dumps(body)) // 4 + 1 + body["max_tokens"]


def test_a_budget_holds_across_two_routers_and_runs_out_mid_stream(spawn, tmp_path, postgres_url):
    """Two routers, one database, requests alternating between them: the tokens given
    against a daily budget stay within the stated bound (llmlb.router.control.quota: the
    budget + the reservation of the request that crossed it + what requests use beyond their
    reservation, none here) and short of it by less than a request; then both routers refuse
    with 429 ``insufficient_quota``. A stream admitted before the budget ran out on the other
    router finishes, and its tokens count. Routers that shut down give back what they held:
    the leases in the database then equal the tokens given."""
    mock = start_mock(spawn, "mock-budget")[1]
    routers = _two_routers(spawn, tmp_path, postgres_url)
    beats = Beats(routers[0])
    try:
        beats.register("budget-node", f"{mock}/_mock/b/ok", ready(MODEL))
        beats.register("budget-drip", f"{mock}/_mock/d/drip300", ready("tenancy/drip"))
        warm = new_key(routers[0])
        for router in routers:
            for model in (MODEL, "tenancy/drip"):
                wait_until(
                    lambda r=router, m=model: chat(r, warm, model=m).status == 200,
                    timeout=15,
                    message="routed",
                )
        reservation = _reserves(CHAT)  # the mock uses 21 of them
        budget = 3200  # slices of 50
        limited = new_key(routers[0], budget_tokens=budget, budget_period="day")
        given, refusals, index = 0, 0, 0
        while refusals < 2:  # one refusal by each router in a row: the budget is leased out
            reply = chat(routers[index % 2], limited)
            index += 1
            if reply.status == 200:
                given += reply.json["usage"]["total_tokens"]
                refusals = 0
                continue
            assert reply.status == 429 and reply.json["error"]["code"] == "insufficient_quota"
            refusals += 1
            assert index < 1000, "never ran out"
        assert budget - reservation < given <= budget + reservation, given
        for router in routers:
            refused = chat(router, limited)
            assert refused.status == 429 and refused.json["error"]["code"] == "insufficient_quota"
            assert int(refused.headers["retry-after"]) >= 1

        small = new_key(routers[0], budget_tokens=200, budget_period="day")
        running = Stream(routers[0], small, {"model": "tenancy/drip"})
        try:
            assert running.event() is not None  # admitted and in flight on router 0
            spent = 0
            while (reply := chat(routers[1], small)).status == 200:
                spent += reply.json["usage"]["total_tokens"]
            assert reply.status == 429 and reply.json["error"]["code"] == "insufficient_quota"
            assert running.rest()[-1] == b"[DONE]"  # the running one finishes
        finally:
            running.close()
        # The stream reported no usage: its reservation stands as what it used.
        streamed = _reserves({**CHAT, "model": "tenancy/drip", "stream": True})
        assert spent + streamed <= 200 + reservation
        for router in routers:
            refused = chat(router, small)
            assert refused.status == 429 and refused.json["error"]["code"] == "insufficient_quota"
        listed = call(routers[0], "GET", "/v0/keys", ADMIN).json["keys"]
        limited_id = next(k["id"] for k in listed if k.get("budget_tokens") == budget)
    finally:
        beats.close()
    # A router that shuts down gives back what it holds: leased = spent.
    assert _leased_after_shutdown(routers, postgres_url, "budget_leases", limited_id) == given


# -- audit log ------------------------------------------------------------------------------


def _audit_verify(router: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LLMLB, "audit", "verify", "--router", router, "--api-key", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_audit_chain_records_admin_actions_and_detects_tampering(
    request, spawn, tmp_path, backend
):
    home = tmp_path / "home"
    home.mkdir()
    target: str | Path = home / "lb.db"
    args: tuple[str, ...] = ()
    if backend == "postgresql":
        target = request.getfixturevalue("postgres_url")
        args = ("--db", str(target))
    router = start_router(spawn, home, ADMIN, *args)
    created = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api", "name": "audited", "rpm": 5})
    key_id_ = created.json["id"]
    assert call(router, "PATCH", f"/v0/keys/{key_id_}", ADMIN, {"rpm": 9}).status == 200
    assert call(router, "PATCH", f"/v0/keys/{key_id_}", ADMIN, {"rpm": -1}).status == 400
    assert call(router, "DELETE", f"/v0/keys/{key_id_}", ADMIN).status == 204
    log = call(router, "GET", "/v0/audit", ADMIN)
    assert log.status == 200 and log.json["count"] == 3
    entries = log.json["entries"]
    assert [e["action"] for e in entries] == ["key.created", "key.changed", "key.revoked"]
    assert {e["actor"] for e in entries} == {"key_admin_env"}
    assert {e["target"] for e in entries} == {key_id_}
    assert entries[0]["change"] == {"scope": "api", "name": "audited", "rpm": 5}
    assert entries[1]["change"] == {"rpm": 9}
    assert created.json["key"].encode() not in log.body and ADMIN.encode() not in log.body
    assert call(router, "GET", "/v0/audit", created.json["key"]).status == 401  # revoked
    ok = _audit_verify(router)
    assert ok.returncode == 0 and "ok: 3 entries" in ok.stdout, ok.stdout + ok.stderr

    conn = db.open_database(target)
    try:
        with db.transaction(conn):
            conn.execute("UPDATE audit_log SET change = ? WHERE seq = 2", ('{"rpm":1000}',))
        altered = _audit_verify(router)
        assert altered.returncode == 1 and "entry 2: altered" in altered.stdout
        with db.transaction(conn):
            conn.execute("UPDATE audit_log SET change = ? WHERE seq = 2", ('{"rpm":9}',))
        assert _audit_verify(router).returncode == 0
        with db.transaction(conn):
            conn.execute("DELETE FROM audit_log WHERE seq = 2")
        removed = _audit_verify(router)
        assert removed.returncode == 1 and "entry 2 is missing" in removed.stdout
        with db.transaction(conn):
            conn.execute("DELETE FROM audit_log WHERE seq = 3")
        assert "ends at entry 1 but 3 were written" in _audit_verify(router).stdout
    finally:
        conn.close()


# -- CLI ------------------------------------------------------------------------------------


def _cli(router: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LLMLB, *args, "--router", router, "--api-key", ADMIN],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_sets_shows_and_changes_limits_and_reads_usage(router, node):
    made = _cli(
        router, "keys", "create", "--scope", "api", "--name", "cli-limited", "--rpm", "30",
        "--models", "tenancy/*,org/x", "--budget-tokens", "900", "--budget-period", "day",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-")
    listed = _cli(router, "keys", "ls")
    line = next(row for row in listed.stdout.splitlines() if "cli-limited" in row)
    assert "rpm=30" in line and "models=tenancy/*,org/x" in line and "budget_tokens=900" in line
    key_id_ = line.split()[0]
    changed = _cli(router, "keys", "update", key_id_, "--rpm", "none", "--priority", "high")
    assert changed.returncode == 0, changed.stderr
    assert "priority=high" in changed.stdout and "rpm" not in changed.stdout
    bad = _cli(router, "keys", "update", key_id_, "--tpm", "-3")
    assert bad.returncode == 1 and "tpm" in bad.stderr and "invalid_limit" in bad.stderr
    assert _cli(router, "keys", "update", key_id_).returncode == 2  # nothing to change

    assert chat(router, key).status == 200  # 21 tokens
    table = _cli(router, "usage", "--key", key_id_, "--group-by", "key,model")
    assert table.returncode == 0, table.stderr
    row = next(r for r in table.stdout.splitlines() if r.startswith(key_id_))
    assert row.split()[1:4] == [MODEL, "1", "12"]
    csv_out = _cli(router, "usage", "--key", key_id_, "--group-by", "model", "--csv")
    assert csv_out.stdout.splitlines()[1].startswith(f"{MODEL},1,12,0,9,21,0")
    own = subprocess.run(
        [*LLMLB, "usage", "--self", "--router", router, "--api-key", key],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert own.returncode == 0, own.stderr
    assert "budget: 21 of 900 tokens this day (879 left)" in own.stdout


def test_rpm_is_exact_across_the_workers_of_one_router_on_sqlite(spawn, tmp_path):
    """Two workers of one router on SQLite lease the key's quota from the file, as routers
    on PostgreSQL do: the router admits the rpm, not the rpm per worker."""
    mock = start_mock(spawn, "mock-workers")[1]
    home = tmp_path / "home"
    home.mkdir()
    env = {"LLMLB_HEARTBEAT_INTERVAL_S": "1"}
    router = start_router(spawn, home, ADMIN, "--workers", "2", env=env)
    beats = Beats(router)
    try:
        beats.register("workers-node", f"{mock}/_mock/w/ok", ready(MODEL))
        warm = new_key(router)
        wait_until(lambda: chat(router, warm).status == 200, timeout=15, message="routed")
        limited = new_key(router, rpm=30)
        wait_until(  # both workers know the key (the model list is not rate limited)
            lambda: all(call(router, "GET", "/v1/models", limited).status == 200 for _ in range(8)),
            timeout=10,
            message="the key in every worker",
        )
        statuses = [chat(router, limited).status for _ in range(80)]  # a new connection each
        assert statuses.count(200) == 30 and set(statuses) == {200, 429}
    finally:
        beats.close()


def test_max_parallel_holds_across_the_workers_of_one_router_on_sqlite(spawn, tmp_path):
    """Two workers of one router on SQLite lease parallel slots from the file: with one
    request of a ``max_parallel`` 1 key running, the next is refused whichever worker takes
    it; once it ended, the router admits again."""
    mock = start_mock(spawn, "mock-workers-parallel")[1]
    home = tmp_path / "home"
    home.mkdir()
    env = {"LLMLB_HEARTBEAT_INTERVAL_S": "1"}
    router = start_router(spawn, home, ADMIN, "--workers", "2", env=env)
    beats = Beats(router)
    try:
        beats.register("workers-drip", f"{mock}/_mock/wp/drip600", ready("tenancy/drip"))
        warm = new_key(router)
        wait_until(
            lambda: chat(router, warm, model="tenancy/drip").status == 200,
            timeout=15,
            message="routed",
        )
        limited = new_key(router, max_parallel=1)
        wait_until(  # both workers know the key (the model list is not rate limited)
            lambda: all(call(router, "GET", "/v1/models", limited).status == 200 for _ in range(8)),
            timeout=10,
            message="the key in every worker",
        )
        running: list[Stream] = []

        def start_one() -> bool:  # the other worker gives back its idle slot when wanted
            stream = Stream(router, limited, {"model": "tenancy/drip"})
            if stream.resp.status != 200:
                stream.close()
                return False
            assert stream.event() is not None  # in flight now
            running.append(stream)
            return True

        wait_until(start_one, timeout=10, interval=0.1, message="one request running")
        try:
            statuses = [chat(router, limited, model="tenancy/drip").status for _ in range(8)]
            assert statuses == [429] * 8  # a new connection each: both workers refuse
            assert running[0].rest()[-1] == b"[DONE]"
        finally:
            running[0].close()
        wait_until(
            lambda: chat(router, limited, model="tenancy/drip").status == 200,
            timeout=5,
            interval=0.1,
            message="admitted again once the running request ended",
        )
    finally:
        beats.close()


def test_a_router_that_lost_the_database_grants_no_more_than_it_holds(
    spawn, tmp_path, own_postgres
):
    """PostgreSQL stops: a limited key gets at most what the router's current lease holds
    (a second's share of its rpm; what is left of its budget slice), then 429; an unlimited
    key is served from the caches."""
    mock = start_mock(spawn, "mock-outage")[1]
    home = tmp_path / "home"
    home.mkdir()
    url = own_postgres.create_database()
    router = start_router(spawn, home, ADMIN, "--db", url, env={"LLMLB_HEARTBEAT_INTERVAL_S": "1"})
    beats = Beats(router)
    try:
        beats.register("outage-node", f"{mock}/_mock/o/ok", ready(MODEL))
        free = new_key(router)
        wait_until(lambda: chat(router, free).status == 200, timeout=15, message="routed")
        limited = new_key(router, rpm=600)  # leased 10 at a time
        budgeted = new_key(router, budget_tokens=6400, budget_period="day")  # slices of 100
        assert chat(router, limited).status == 200
        assert chat(router, budgeted).status == 200  # holds 100 - 21 (the mock's usage)
        beats.close()  # no heartbeat into a router without its database
        own_postgres.stop()
        statuses = [chat(router, budgeted).status for _ in range(10)]
        admitted = statuses.count(200)
        assert admitted >= 1 and admitted * 21 + _reserves(CHAT) <= 100, statuses
        assert statuses == [200] * admitted + [429] * (10 - admitted), statuses
        statuses = [chat(router, limited).status for _ in range(40)]
        assert statuses.count(200) <= 10 and statuses.count(429) >= 30, statuses
        refused = chat(router, limited)
        assert refused.status == 429 and refused.json["error"]["code"] == "rate_limit_exceeded"
        assert chat(router, free).status == 200  # no limits: nothing to lease
    finally:
        beats.close()


# -- priority on the node -----------------------------------------------------------------

GEMMA = "google/gemma-3-270m-it"
GEMMA_ENDS = {"1": -100, "106": -100}  # <eos>, <end_of_turn>: generation runs to max_tokens


def test_the_node_starts_a_waiting_high_request_before_a_low_one(spawn, tmp_path, gemma_gguf):
    """A node with one slot (the real Gemma): while a long request holds it, a ``low`` request
    and then a ``high`` one wait; the ``high`` one starts first."""
    store = tmp_path / "store"
    place_model(store, GEMMA, gemma_gguf, GEMMA_CHAT_TEMPLATE)
    node = start_node(spawn, "", None, store, "--concurrency", "1", "--queue-timeout", "300")
    body = {"model": GEMMA, "messages": [{"role": "user", "content": "Count."}],
            "logit_bias": GEMMA_ENDS, "stream": True}  # fmt: skip
    wait_until(
        lambda: call(node, "POST", "/v1/chat/completions", None, {**body, "max_tokens": 2}).status
        == 200,
        timeout=60,
        message="the model served",
    )
    first_token: dict[str, float] = {}

    def stream(name: str, priority: str | None, max_tokens: int) -> threading.Thread:
        host, port = node.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        headers = {"Content-Type": "application/json"}
        if priority:
            headers["X-Llmlb-Priority"] = priority
        conn.request("POST", "/v1/chat/completions", orjson.dumps(
            {**body, "max_tokens": max_tokens}), headers)  # fmt: skip

        def read() -> None:
            resp = conn.getresponse()
            assert resp.status == 200
            while line := resp.readline():
                if b'"content"' in line and name not in first_token:
                    first_token[name] = time.monotonic()
            conn.close()

        thread = threading.Thread(target=read)
        thread.start()
        return thread

    holder = stream("holder", "low", 48)
    wait_until(lambda: "holder" in first_token, timeout=60, message="the slot taken")
    low = stream("low", "low", 2)
    high = stream("high", "high", 2)
    for thread in (holder, low, high):
        thread.join(timeout=180)
    assert first_token["high"] < first_token["low"], first_token
