"""``llmlb models|nodes|pull`` against a real router and the hub stand-in."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import orjson
import pytest
from llmlb.cli.progress import PullDisplay, progress_from_nodes
from llmlb.model_storage import ModelStorage
from llmlb.node.models.download.options import DownloadProgress

from tests.factories import write_gguf
from tests.hub_fixtures import make_repo, start_hub
from tests.procs import LLMLB, free_port
from tests.router_fixtures import call, start_router

ADMIN = "sk-admin-cli-models-test"


@pytest.fixture
def fleet(spawn, tmp_path: Path):
    """A hub stand-in with three tiny GGUF repos and a router reading it."""
    root = tmp_path / "hub"
    for repo in ("org/tiny", "org/other"):
        make_repo(
            root,
            repo,
            {
                "tiny-Q4_K_M.gguf": write_gguf(
                    tmp_path / "src" / repo / "tiny-Q4_K_M.gguf", arch="llama", file_type="Q4_K_M"
                )
            },
        )
    broken = write_gguf(tmp_path / "src" / "broken.gguf", arch="llama", truncate=True)
    make_repo(root, "org/broken", {"broken.gguf": broken})
    hub = start_hub(spawn, root)
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    return hub, router


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``llmlb ARGS`` and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*LLMLB, *args], capture_output=True, text=True, env=full_env, timeout=120, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: str) -> None:
    """Non-zero exit, and stderr is one readable line naming ``code`` (no traceback)."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert code in lines[0]
    assert "Traceback" not in result.stderr


def test_models_register_ls_rm_and_nodes_ls(fleet) -> None:
    hub, router = fleet
    env = {"LLMLB_ROUTER_URL": router, "LLMLB_ADMIN_KEY": ADMIN}

    done = cli("models", "register", "org/tiny", env=env)
    assert done.returncode == 0, done.stderr
    assert "registered org/tiny (gguf" in done.stdout
    other = cli("models", "register", "Org/Other", "--json", env=env)
    assert other.returncode == 0, other.stderr
    assert orjson.loads(other.stdout)["id"] == "org/other"
    assert_one_line_error(cli("models", "register", "org/tiny", env=env), "model_exists")
    assert_one_line_error(cli("models", "register", "org/nope", env=env), "hub_repo_not_found")

    # A node reports org/tiny half downloaded (through the real node API).
    node_key = call(router, "POST", "/v0/keys", ADMIN, {"scope": "node"}).json["key"]
    report = {"id": "org/tiny", "state": "downloading", "progress": {"bytes": 50, "total": 200}}
    reply = call(
        router,
        "POST",
        "/v0/nodes",
        node_key,
        {
            "node_id": "gpu-1",
            "url": f"http://127.0.0.1:{free_port()}",
            "runtimes": ["llama_cpp"],
            "gpu": {"backend": "cpu"},
            "slots": 2,
            "models": [report],
        },
    )
    assert reply.status in (200, 201), reply.body

    table = cli("models", "ls", env=env)
    assert table.returncode == 0, table.stderr
    assert "READY NODES" in table.stdout and "PROGRESS" in table.stdout
    tiny_row = next(line for line in table.stdout.splitlines() if line.startswith("org/tiny"))
    assert "gguf" in tiny_row and "downloading" in tiny_row and "(25%)" in tiny_row
    listed = {m["id"]: m for m in orjson.loads(cli("models", "ls", "--json", env=env).stdout)}
    assert listed["org/tiny"]["progress"] == {
        "state": "downloading",
        "bytes": 50,
        "total": 200,
        "error": None,
        "nodes_downloading": 1,
    }
    assert listed["org/tiny"]["format"] == "gguf" and listed["org/tiny"]["size_bytes"] > 0

    nodes = cli("nodes", "ls", env=env)
    assert nodes.returncode == 0, nodes.stderr
    assert "gpu-1" in nodes.stdout and "online" in nodes.stdout
    assert "org/tiny (downloading)" in nodes.stdout
    nodes_json = orjson.loads(cli("nodes", "ls", "--json", env=env).stdout)
    assert [n["node_id"] for n in nodes_json] == ["gpu-1"]

    assert cli("models", "rm", "org/other", env=env).returncode == 0
    listed = orjson.loads(cli("models", "ls", "--json", env=env).stdout)
    assert "org/other" not in {m["id"] for m in listed}
    assert_one_line_error(cli("models", "rm", "org/other", env=env), "model_not_found")
    assert_one_line_error(cli("models", "ls", "--api-key", "sk-wrong", env=env), "invalid_api_key")
    assert_one_line_error(
        cli("nodes", "ls", "--router", f"http://127.0.0.1:{free_port()}", env=env), "unreachable"
    )


def test_pull_downloads_validates_and_reports_progress(fleet, tmp_path: Path) -> None:
    hub, router = fleet
    env = {"LLMLB_ROUTER_URL": router, "LLMLB_ADMIN_KEY": ADMIN, "HF_ENDPOINT": hub}
    store = tmp_path / "store"
    for repo in ("org/tiny", "org/broken"):
        assert call(router, "POST", "/v1/models/register", ADMIN, {"repo": repo}).status == 201

    pulled = cli("pull", "org/tiny", "--models-dir", str(store), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert "org/tiny is ready in" in pulled.stdout
    # Progress lines: bytes, rate, file count and the file being fetched, then "done".
    assert "tiny-Q4_K_M.gguf" in pulled.stderr and "files 1/1" in pulled.stderr
    assert "/s" in pulled.stderr and "done" in pulled.stderr
    assert ModelStorage(str(store)).validate("org/tiny") == []

    again = cli("pull", "org/tiny", "--models-dir", str(store), env=env)
    assert again.returncode == 0 and "org/tiny is ready in" in again.stdout

    # Downloads fine (sizes and hashes match the hub) but is not a usable GGUF: exit 1.
    broken = cli("pull", "org/broken", "--models-dir", str(store), env=env)
    assert broken.returncode == 1
    assert "org/broken" in broken.stderr and "Traceback" not in broken.stderr
    assert ModelStorage(str(store)).resolve("org/broken") is None

    missing = cli("pull", "org/missing", "--models-dir", str(store), env=env)
    assert missing.returncode == 1 and "not registered" in missing.stderr


def test_pull_live_display_shows_bytes_and_files() -> None:
    out = io.StringIO()
    snapshots = [
        DownloadProgress("org/m", 0, 3000, 0, 2, "a.gguf", 0, 1000),
        DownloadProgress("org/m", 1000, 3000, 1, 2, "a.gguf", 1000, 1000),
        DownloadProgress("org/m", 2500, 3000, 1, 2, "b.gguf", 1500, 2000),
    ]
    with PullDisplay("org/m", stream=out, live=True) as display:
        for snapshot in snapshots:
            display(snapshot)
    text = out.getvalue()
    assert "org/m [1/2 files]" in text
    assert "a.gguf" in text and "b.gguf" in text
    assert "2.4/2.9 KiB" in text  # total bytes column


def test_progress_aggregates_online_nodes_only() -> None:
    def node(status: str, *models: dict) -> dict:
        return {"status": status, "models": list(models)}

    def report(state: str, done: int = 0, total: int = 0, error: str | None = None) -> dict:
        return {
            "id": "m",
            "state": state,
            "progress": {"bytes": done, "total": total},
            "error": error,
        }

    nodes = [
        node("online", report("ready")),
        node("online", report("downloading", 30, 100)),
        node("online", report("downloading", 10, 100)),
        node("offline", report("downloading", 99, 100)),
    ]
    progress = progress_from_nodes(nodes, "m")
    assert (progress.state, progress.nodes_ready, progress.downloading) == ("ready", 1, 2)
    assert progress.describe() == "downloading 40 B / 200 B (20%)"
    assert not progress.failed

    failed = progress_from_nodes([node("online", report("failed", error="disk full"))], "m")
    assert failed.failed and failed.describe() == "failed: disk full"
    assert progress_from_nodes([node("offline", report("ready"))], "m").state is None
    assert progress_from_nodes(nodes, "other").describe() == "-"
