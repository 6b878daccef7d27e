"""Schemathesis checks the running router against its own ``/openapi.json``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.hub_fixtures import make_repo, start_hub
from tests.router_fixtures import call, start_router

ADMIN = "sk-test-admin-key-openapi"

# Ids, repos and node URLs have rules JSON Schema cannot state exactly (hub naming, id
# segments, reachable URLs); the router answers those with a documented 400, so "schema-valid
# data must be accepted" is not checked on the operations taking them. Every other check runs
# everywhere: schema-violating data is rejected, status codes, headers and bodies match the
# document, auth is enforced, methods not in the document get 405, links between operations.
_NO_POSITIVE_CHECK = "|".join(
    [
        r"^/v1/(chat/completions|completions|embeddings|responses|messages(/count_tokens)?)$",
        r"^/v1/models/register$",
        r"^/v1/models/\{model_id\}$",
        r"^/v0/models/registry/",
        r"^/v0/models/\{model_id\}/retry$",
        r"^/v0/nodes",
        r"^/v0/peers/report$",
        r"^/v0/keys",  # limit values: model ids in the allowlist, times up to year 9999
    ]
)
# Control-plane bodies refuse NUL characters in any string, known field or not (documented:
# "Limits on requests"); JSON Schema cannot say "no NUL in any string" short of a pattern on
# each, so generated data leaves NUL out.
CONFIG = f"""
[generation]
allow-x00 = false

[[operations]]
include-path-regex = '{_NO_POSITIVE_CHECK}'
checks.positive_data_acceptance.enabled = false
"""


def test_router_conforms_to_its_openapi_document(spawn, tmp_path: Path):
    root = tmp_path / "hub"
    # The repo the document's registration example names.
    make_repo(root, "unsloth/gemma-3-270m-it-GGUF", {"gemma-3-270m-it-Q4_K_M.gguf": b"GGUF" * 8})
    hub = start_hub(spawn, root)
    router = start_router(spawn, tmp_path / "home", ADMIN, env={"HF_ENDPOINT": hub})
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    argv = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file", str(config),
        "run", f"{router}/openapi.json",
        "--header", f"Authorization: Bearer {ADMIN}",
        "--suppress-health-check", "filter_too_much",
        "--max-examples", "10",
        "--seed", "1",
        "--workers", "1",
        "--no-shrink",
        "--request-timeout", "20",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Operations:       31 selected / 31 total" in output, output
    # The registration example ran with the admin key and reached the hub.
    assert "registered model unsloth/gemma-3-270m-it-gguf" in router.proc.log(), output
    assert call(router, "GET", "/health").status == 200
