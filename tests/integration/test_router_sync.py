"""Sync notifications to nodes: payload, token, and the exponential backoff schedule."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.hub_fixtures import make_repo, start_hub
from tests.procs import wait_until
from tests.router_fixtures import NodeStandin, call, start_router

ADMIN = "sk-test-admin-key-sync"
GGUF = b"GGUF" + bytes(1024)


@pytest.fixture
def hub(spawn, tmp_path) -> str:
    root = tmp_path / "hub"
    for name in ("first", "second", "third"):
        make_repo(root, f"acme/{name}", {f"{name}.gguf": GGUF})
    return start_hub(spawn, root)


def _register_node(router: str, node_id: str, url: str) -> str:
    reply = call(router, "POST", "/v0/nodes", ADMIN, {"node_id": node_id, "url": url})
    assert reply.status == 201
    return reply.json["sync_token"]


def _gaps(node: NodeStandin) -> list[float]:
    times = [a.at for a in node.arrivals]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def _assert_schedule(gaps: list[float], expected: list[float], slack: float) -> None:
    assert len(gaps) == len(expected), gaps
    for gap, want in zip(gaps, expected, strict=True):
        assert want * 0.9 <= gap <= want + slack, (gaps, expected)


def test_backoff_doubles_up_to_the_cap_and_stops_on_unregister(spawn, tmp_path, hub, db_target):
    env = {
        "HF_ENDPOINT": hub,
        "LLMLB_SYNC_BACKOFF_BASE_S": "0.1",
        "LLMLB_SYNC_BACKOFF_MAX_S": "0.4",
    }
    router = start_router(spawn, tmp_path / "home", ADMIN, "--db", str(db_target), env=env)
    with NodeStandin(failures=6) as node, NodeStandin(failures=10**6) as dead:
        token = _register_node(router, "n1", node.url)
        started = time.monotonic()
        reply = call(router, "POST", "/v1/models/register", ADMIN, {"repo": "acme/first"})
        assert reply.status == 201
        answered = time.monotonic()
        wait_until(lambda: len(node.arrivals) >= 7, timeout=15, message="7 sync attempts")
        assert [a.status for a in node.arrivals] == [500] * 6 + [200]
        # The admin request did not wait for the node: it was answered before the retries ran.
        assert answered - started < node.arrivals[-1].at - started
        _assert_schedule(_gaps(node), [0.1, 0.2, 0.4, 0.4, 0.4, 0.4], slack=0.3)
        first = node.arrivals[0]
        assert first.path == "/api/models/sync"
        assert first.headers["authorization"] == f"Bearer {token}"
        assert orjson.loads(first.body) == {"models": ["acme/first"], "action": "register"}

        assert call(router, "DELETE", "/v1/models/acme/first", ADMIN).status == 204
        wait_until(lambda: len(node.arrivals) == 8, timeout=10, message="delete notification")
        assert orjson.loads(node.arrivals[-1].body) == {
            "models": ["acme/first"],
            "action": "delete",
        }
        assert node.arrivals[-1].status == 200

        # A node that keeps failing is retried until it unregisters, then left alone.
        _register_node(router, "n2", dead.url)
        assert (
            call(router, "POST", "/v1/models/register", ADMIN, {"repo": "acme/second"}).status
            == 201
        )
        wait_until(lambda: len(dead.arrivals) >= 3, timeout=10, message="retries to n2")
        assert call(router, "DELETE", "/v0/nodes/n2", ADMIN).status == 204
        seen = len(dead.arrivals)
        with pytest.raises(TimeoutError):  # several capped periods pass without a retry
            wait_until(lambda: len(dead.arrivals) > seen + 1, timeout=1.5)
        assert len(node.arrivals) == 9  # n1 got the second model, first time


def test_default_backoff_is_one_two_four_seconds(spawn, tmp_path, hub):
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    with NodeStandin(failures=3) as node:
        _register_node(router, "n1", node.url)
        assert (
            call(router, "POST", "/v1/models/register", ADMIN, {"repo": "acme/third"}).status == 201
        )
        wait_until(lambda: len(node.arrivals) >= 4, timeout=20, message="4 sync attempts")
        assert [a.status for a in node.arrivals] == [500, 500, 500, 200]
        _assert_schedule(_gaps(node), [1.0, 2.0, 4.0], slack=0.6)
