"""Cold-start benchmark: from "asked for" to "first token" (or ready), against the baselines.

Usage::

    .venv/bin/python bench/coldstart/run.py [--runs 5] [--scenarios 1,2,3,4]
        [--out bench/results/coldstart.json] [--caps 25M,none] [--kinds gguf,sharded]
        [--models 1000] [--shards 8] [--shard-mib 32] [--no-verify] [--no-readme]
        [--workdir DIR] [--keep]
    .venv/bin/python bench/coldstart/run.py --render bench/results/coldstart.json

Scenarios (see ``bench/README.md``, section "Cold start"):

1. warm store: first request for a not-yet-loaded model → first streamed token, vs the floor;
2. cold page cache (``POSIX_FADV_DONTNEED``), node with and without prefetch, vs the floor;
3. missing model: register → downloaded, verified, loaded, hub stand-in capped per
   connection and uncapped, vs ``snapshot_download`` + load; raw loopback copy rate;
   verification's share of the download;
4. node start-up with many models in the store → ``/ready``.

Writes the results as JSON (``--out``), prints a Markdown table and refreshes the generated
table in ``bench/README.md`` (only after a full run of all four scenarios). Every process
runs in a fresh temporary directory and is stopped when its scenario ends (or the run is
interrupted).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import orjson  # noqa: E402

from bench.coldstart import local, missing, report, scale  # noqa: E402
from bench.coldstart.common import REPO_ROOT, install_signal_handlers, workdir  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="llmlb cold-start benchmark (scenarios 1-4, see bench/README.md)"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per measure (5)")
    parser.add_argument("--scenarios", default="1,2,3,4", help="comma-separated (1,2,3,4)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/coldstart.json")
    parser.add_argument(
        "--caps",
        default="25M,none",
        help="hub per-connection caps for scenario 3; 'none' = uncapped",
    )
    parser.add_argument("--kinds", default="gguf,sharded", help="scenario 3 models")
    parser.add_argument("--models", type=int, default=1000, help="scenario 4 store size")
    parser.add_argument("--shards", type=int, default=8, help="safetensors shards (8)")
    parser.add_argument("--shard-mib", type=int, default=32, help="MiB per shard (32)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the with/without-hashing measurement"
    )
    parser.add_argument(
        "--no-router", action="store_true", help="scenario 4: local-only start-up only"
    )
    parser.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "bench/README.md")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temp dirs")
    parser.add_argument("--keep", action="store_true", help="keep temp dirs and logs")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: print the table of an earlier results file and update the README",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; returns 1 if any scenario failed."""
    args = _parse(argv)
    if args.render is not None:
        results = orjson.loads(args.render.read_bytes())
        print(report.table(results))
        if not args.no_readme:
            report.update_readme(args.readme, results)
        return 0
    install_signal_handlers()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    caps = [
        None if c.strip().lower() in ("none", "0", "") else c.strip() for c in args.caps.split(",")
    ]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    results: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "git": _git_rev(),
            "runs": args.runs,
            "load_before": _load(),
            "command": "bench/coldstart/run.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "scenarios": {},
        "errors": {},
    }
    started = time.monotonic()
    for scenario in chosen:
        print(f"== scenario {scenario} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            with workdir(args.workdir, args.keep) as work:
                if scenario == "1":
                    out = local.warm_store(work, args.runs)
                elif scenario == "2":
                    out = local.cold_cache(work, args.runs)
                elif scenario == "3":
                    out = missing.missing_model(
                        work,
                        args.runs,
                        caps,
                        kinds,
                        args.shards,
                        args.shard_mib,
                        verify=not args.no_verify,
                    )
                elif scenario == "4":
                    out = scale.many_models(
                        work, args.runs, args.models, with_router=not args.no_router
                    )
                else:
                    raise ValueError(f"unknown scenario {scenario!r}")
            results["scenarios"][scenario] = out
        except KeyboardInterrupt:
            results["errors"][scenario] = "interrupted"
            break
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next scenario
            traceback.print_exc()
            results["errors"][scenario] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"   scenario {scenario}: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    results["meta"]["load_after"] = _load()
    results["meta"]["wall_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(report.table(results))
    for scenario, error in results["errors"].items():
        print(f"\nscenario {scenario} failed: {error.splitlines()[0]}")
    print(f"\nresults: {args.out}")
    complete = set(results["scenarios"]) == {"1", "2", "3", "4"}
    if not args.no_readme and complete:
        report.update_readme(args.readme, results)
        print(f"table updated in {args.readme}")
    elif not args.no_readme:
        print(f"{args.readme} left alone: it is only updated by a full, error-free run")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
