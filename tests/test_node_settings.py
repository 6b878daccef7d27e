"""``llmlb node``'s flags reach the engine and the downloader through the nested options of
:class:`llmlb.node.settings.NodeSettings`, across the JSON hand-off to the server process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from llmlb.cli.main import build_parser
from llmlb.cli.node import settings_from_args
from llmlb.node.inference.engine import EngineOptions
from llmlb.node.models.download.options import DEFAULT_CONNECTIONS, DownloadOptions
from llmlb.node.service import Node
from llmlb.node.settings import NodeSettings


def _settings(tmp_path: Path, *flags: str) -> NodeSettings:
    argv = ["node", "--router", "", "--models-dir", str(tmp_path), *flags]
    return settings_from_args(build_parser("node").parse_args(argv))


def test_every_engine_and_download_flag_reaches_the_node(tmp_path: Path) -> None:
    flags = [
        "--max-loaded", "3",
        "--concurrency", "7",
        "--queue-timeout", "2.5",
        "--queue-depth", "0",
        "--ctx-size", "2048",
        "--max-tokens", "99",
        "--threads", "2",
        "--threads-batch", "3",
        "--cache-ram", "5",
        "--no-extra-buffer-types",
        "--connections", "9",
    ]  # fmt: skip
    settings = NodeSettings.from_json(_settings(tmp_path, *flags).to_json())
    node = Node(settings)
    try:
        assert node.engine.options == EngineOptions(
            max_loaded=3,
            concurrency=7,
            queue_timeout_s=2.5,
            queue_depth=0,
            n_ctx=2048,
            max_tokens=99,
            threads=2,
            threads_batch=3,
            extra_buffer_types=False,
            cache_ram_bytes=5 << 20,
        )
        assert node.resolver.options == DownloadOptions(connections=9)
        assert node.sync._registration()["slots"] == 7
    finally:
        asyncio.run(node.stop())


def test_defaults_are_the_options_own(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "--cache-ram", "1024")
    assert settings.engine == EngineOptions()
    assert settings.download == DownloadOptions()
    assert settings.download.connections == DEFAULT_CONNECTIONS
    on = _settings(tmp_path, "--extra-buffer-types", "--queue-depth", "40")
    assert on.engine.extra_buffer_types is True and on.engine.queue_depth == 40


def test_settings_json_round_trips_and_ignores_unknown_keys(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "--queue-depth", "5", "--no-extra-buffer-types")
    assert NodeSettings.from_json(settings.to_json()) == settings
    text = settings.to_json().replace('"queue_depth":5', '"queue_depth":5,"gone":1', 1)
    assert NodeSettings.from_json(text) == settings


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--queue-depth", "-1"], "--queue-depth must be >= 0"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
        (["--connections", "0"], "--connections must be >= 1"),
    ],
)
def test_out_of_range_flags_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(tmp_path, *flags)


def test_the_routers_body_limit_is_read_once_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMLB_MAX_BODY_BYTES", "12345")
    settings = NodeSettings.from_json(_settings(tmp_path).to_json())
    monkeypatch.setenv("LLMLB_MAX_BODY_BYTES", "99")  # later changes reach no running node
    assert settings.max_body_bytes == 12345
    monkeypatch.setenv("LLMLB_MAX_BODY_BYTES", "many")
    with pytest.raises(ValueError, match="LLMLB_MAX_BODY_BYTES"):
        _settings(tmp_path)
