"""``GET /v0/traffic`` with several router workers: each shows the whole router's traffic."""

from __future__ import annotations

from tests.procs import wait_until
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-traffic-workers"


def test_every_worker_shows_the_traffic_of_all_workers(spawn, tmp_path):
    router = start_router(spawn, tmp_path / "home", ADMIN, "--workers", "2")
    sampling: set[int] = set()

    def both_workers_sampling() -> bool:
        data = call(router, "GET", "/v0/traffic", ADMIN).json
        if data["t"]:  # its baseline is taken: what follows is history
            sampling.add(data["worker"])
        return len(sampling) == 2

    wait_until(both_workers_sampling, timeout=20, interval=0.1, message="both workers sampling")
    body = {"model": "no-such-model", "prompt": "x", "max_tokens": 1}
    for _ in range(12):  # a new connection each: both workers answer some
        assert call(router, "POST", "/v1/completions", ADMIN, body).status == 404
    complete: set[int] = set()

    def both_workers_saw_all() -> bool:
        data = call(router, "GET", "/v0/traffic", ADMIN).json
        if sum(data["total"]["rejected"]) == 12 and sum(data["total"]["errors"]) == 12:
            complete.add(data["worker"])
        return len(complete) == 2

    wait_until(both_workers_saw_all, timeout=20, interval=0.1, message="both workers' history")
