"""``llmlb router`` builds its settings once (flags over the environment and config.json) and
hands them to its workers as one JSON blob (``LLMLB_ROUTER_SETTINGS``); a worker reads
nothing else."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from llmlb.cli.main import build_parser
from llmlb.cli.router import _settings
from llmlb.router.control.fleet import FleetView
from llmlb.router.control.settings import SETTINGS_ENV, RouterSettings
from llmlb.router.proxy.proxy import InferenceProxy

ENV = (
    "LLMLB_NODE_APPROVAL",
    "LLMLB_ROUTING",
    "LLMLB_ROUTER_DB",
    "LLMLB_PROXY_MAX_INFLIGHT",
    "LLMLB_PROXY_COOLDOWN_S",
    "LLMLB_PEER_SEEDS",
    "LLMLB_PEER_WAIT_S",
    "LLMLB_FLEET_SECRET",
    "LLMLB_MAX_BODY_BYTES",
    SETTINGS_ENV,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMLB_HOME", str(tmp_path))
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _parsed(*flags: str):
    return build_parser("router").parse_args(["router", *flags])


def test_flags_and_environment_reach_the_worker_through_one_blob(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_PEER_SEEDS", "3")
    monkeypatch.setenv("LLMLB_PEER_WAIT_S", "7.5")
    monkeypatch.setenv("LLMLB_FLEET_SECRET", "shared-secret")
    monkeypatch.setenv("LLMLB_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("LLMLB_PROXY_COOLDOWN_S", "2.5")
    args = _parsed(
        "--db", str(home / "other.db"),
        "--node-approval", "auto",
        "--routing", "p2c",
        "--max-inflight", "7",
        "--stream-idle-timeout", "2.5",
    )  # fmt: skip
    settings, proxy = _settings(args)
    assert (settings.db_path, settings.node_approval) == (home / "other.db", "auto")
    assert (settings.peer_seeds, settings.peer_wait_s) == (3, 7.5)
    assert settings.fleet_secret == "shared-secret" and settings.max_body_bytes == 4096
    assert (proxy.routing, proxy.max_inflight, proxy.stream_idle_timeout_s) == ("p2c", 7, 2.5)
    assert (proxy.cooldown_s, proxy.max_body_bytes) == (2.5, 4096)

    monkeypatch.setenv(SETTINGS_ENV, settings.to_json())
    for name in ENV[:-1]:  # what a worker's environment says besides the blob is not read
        monkeypatch.setenv(name, "not a valid value")
    worker = RouterSettings.for_worker()
    assert worker == settings
    assert InferenceProxy(FleetView(), worker).settings == proxy


def test_without_flags_the_settings_are_the_environments(home: Path) -> None:
    settings, proxy = _settings(_parsed())
    assert settings.proxy == orjson.loads(orjson.dumps(settings.proxy))
    assert settings.db_path == home / "lb.db" and settings.node_approval == "manual"
    assert proxy.routing == "prefix" and proxy.max_inflight == 2048
    assert RouterSettings.from_json(settings.to_json()) == settings


def test_a_worker_started_without_the_cli_reads_the_environment(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_PEER_SEEDS", "2")
    worker = RouterSettings.for_worker()
    assert worker.peer_seeds == 2 and worker.proxy == {}


def test_an_invalid_environment_is_refused_before_any_worker_starts(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_PEER_WAIT_S", "soon")
    with pytest.raises(ValueError, match="LLMLB_PEER_WAIT_S"):
        _settings(_parsed())
