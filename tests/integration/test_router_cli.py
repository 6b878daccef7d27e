"""``llmlb router`` (start, workers, signals, admin key bootstrap) and ``llmlb keys``."""

from __future__ import annotations

import os
import signal
import stat
import subprocess

import pytest

from tests.procs import LLMLB, free_port, http_status, wait_until
from tests.router_fixtures import call, free_url, start_router

ADMIN = "sk-test-admin-key-cli"


def llmlb(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*LLMLB, *args], capture_output=True, text=True, timeout=60, env=full_env)


def test_keys_cli_create_ls_revoke(spawn, tmp_path):
    router = start_router(spawn, tmp_path / "home", ADMIN)
    flags = ["--router", router, "--api-key", ADMIN]

    created = llmlb("keys", "create", "--scope", "api", "--name", "ci", *flags)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("sk-")  # the key alone
    assert call(router, "GET", "/v1/models", key).status == 200

    # Defaults come from LLMLB_ROUTER_URL and LLMLB_ADMIN_KEY.
    listed = llmlb("keys", "ls", env={"LLMLB_ROUTER_URL": router, "LLMLB_ADMIN_KEY": ADMIN})
    assert listed.returncode == 0, listed.stderr
    assert key not in listed.stdout
    (line,) = [row for row in listed.stdout.splitlines() if row.rstrip().endswith("ci")]
    key_id = line.split()[0]
    assert line.split()[1] == "api"

    revoked = llmlb("keys", "revoke", key_id, *flags)
    assert revoked.returncode == 0, revoked.stderr
    assert call(router, "GET", "/v1/models", key).status == 401

    again = llmlb("keys", "revoke", key_id, *flags)
    assert again.returncode == 1
    assert len(again.stderr.strip().splitlines()) == 1 and "key_not_found" in again.stderr

    wrong = llmlb("keys", "ls", "--router", router, "--api-key", key)
    assert wrong.returncode == 1 and "invalid_api_key" in wrong.stderr
    node_key = llmlb("keys", "create", "--scope", "node", *flags).stdout.strip()
    forbidden = llmlb("keys", "create", "--scope", "api", "--router", router, "--api-key", node_key)
    assert forbidden.returncode == 1 and "insufficient_scope" in forbidden.stderr
    down = llmlb("keys", "ls", "--router", free_url(), "--api-key", ADMIN)
    assert down.returncode == 1 and "cannot reach the router" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1


def test_generated_admin_key_is_private_and_stable(spawn, tmp_path):
    home = tmp_path / "home"
    port = free_port()
    env = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": ""}
    argv = [*LLMLB, "router", "--port", str(port)]
    proc = spawn(argv, env=env, name="router")
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/health")
    key_file = home / "admin.key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in proc.log() and key not in proc.log()  # the path, never the key
    assert call(url, "GET", "/v0/keys", key).status == 200
    assert call(url, "GET", "/v0/keys", ADMIN).status == 401

    # The only admin key cannot be revoked (nobody could manage the router any more).
    (admin,) = call(url, "GET", "/v0/keys", key).json["keys"]
    reply = call(url, "DELETE", f"/v0/keys/{admin['id']}", key)
    assert reply.status == 409 and reply.json["error"]["code"] == "key_protected"

    assert proc.stop() == 0
    proc2 = spawn(argv, env=env, name="router")
    proc2.wait_http(f"{url}/health")
    assert key_file.read_text().strip() == key  # not regenerated while a key exists
    assert call(url, "GET", "/v0/keys", key).status == 200


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_router_stops_cleanly_on_signals(spawn, tmp_path, sig):
    router = start_router(spawn, tmp_path / "home", ADMIN, "--workers", "2")
    router.proc.signal(sig)
    assert router.proc.popen.wait(timeout=20) == 0
    assert http_status(f"{router}/health") is None


def test_workers_share_keys_and_metrics(spawn, tmp_path):
    router = start_router(spawn, tmp_path / "home", ADMIN, "--workers", "2")

    def all_answer(key: str, status: int, n: int = 24) -> bool:
        return all(call(router, "GET", "/v1/models", key).status == status for _ in range(n))

    key_reply = call(router, "POST", "/v0/keys", ADMIN, {"scope": "api"})
    key = key_reply.json["key"]
    wait_until(lambda: all_answer(key, 200), timeout=10, message="new key valid on every worker")
    assert call(router, "DELETE", f"/v0/keys/{key_reply.json['id']}", ADMIN).status == 204
    wait_until(lambda: all_answer(key, 401), timeout=10, message="revoked on every worker")

    text = call(router, "GET", "/metrics", ADMIN).body.decode()
    assert (
        'llmlb_router_http_requests_total{handler="list_models",method="GET",status="200"}' in text
    )
