"""``llmlb storage ls|verify|rm`` run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.factories import make_store_model, write_gguf_model
from tests.procs import LLMLB


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLLM_MODELS_DIR", "LLM_MODELS_DIR", "LLMLB_HOME")
    }
    full_env.update(env or {})
    return subprocess.run(
        [*LLMLB, "storage", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_store_model(root, "openai/gpt-oss-20b")
    make_store_model(root, "org/sharded", "sharded")
    write_gguf_model(root, "broken", truncate=True)
    return root


def test_ls_text_and_json(models: Path) -> None:
    out = run("ls", "--models-dir", str(models))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["openai/gpt-oss-20b", "org/sharded"]
    assert "Q4_K_M" in lines[0] and "safetensors" in lines[1]

    out = run("ls", "--models-dir", str(models), "--json")
    assert out.returncode == 0
    listed = json.loads(out.stdout)
    assert [m["id"] for m in listed] == ["openai/gpt-oss-20b", "org/sharded"]
    assert listed[0]["format"] == "gguf" and listed[0]["architecture"] == "llama"
    assert Path(listed[0]["primary_path"]).is_file()


def test_ls_uses_the_configured_models_dir(models: Path, tmp_path: Path) -> None:
    out = run("ls", "--json", env={"XLLM_MODELS_DIR": str(models)})
    assert [m["id"] for m in json.loads(out.stdout)] == ["openai/gpt-oss-20b", "org/sharded"]
    home = tmp_path / "home"
    make_store_model(home / "models", "from-home")
    out = run("ls", env={"LLMLB_HOME": str(home)})
    assert out.stdout.split()[0] == "from-home"


def test_verify_exit_codes(models: Path) -> None:
    ok = run("verify", "OpenAI/GPT-OSS-20B", "--models-dir", str(models))
    assert ok.returncode == 0 and "openai/gpt-oss-20b: ok" in ok.stdout

    bad = run("verify", "broken", "--models-dir", str(models))
    assert bad.returncode == 1
    assert "truncated tensor data" in bad.stdout

    missing = run("verify", "nope", "--models-dir", str(models), "--json")
    assert missing.returncode == 1
    body = json.loads(missing.stdout)
    assert body["valid"] is False and body["problems"][0].startswith("model directory not found")

    invalid = run("verify", "../etc", "--models-dir", str(models), "--json")
    assert invalid.returncode == 2
    assert "segment '..'" in json.loads(invalid.stdout)["error"]

    good = run("verify", "org/sharded", "--models-dir", str(models), "--json")
    body = json.loads(good.stdout)
    assert good.returncode == 0 and body["valid"] is True and body["problems"] == []
    assert body["model"]["format"] == "safetensors"


def test_rm(models: Path) -> None:
    out = run("rm", "openai/gpt-oss-20b", "--models-dir", str(models))
    assert out.returncode == 0 and "removed openai/gpt-oss-20b" in out.stdout
    assert not (models / "openai").exists()
    again = run("rm", "openai/gpt-oss-20b", "--models-dir", str(models))
    assert again.returncode == 1 and "not found" in again.stderr
    assert run("rm", "a\\b", "--models-dir", str(models)).returncode == 2
