"""A/B comparison of router variants (source trees and/or Granian options) in one run.

    python bench/router/ab.py --variant base:/tmp/old-src --variant 'st::{"runtime_mode":"st"}' \\
        --variant new [--workloads chat-c32,chat-c1,stream-c32] [--rounds 5] [--duration 5]

A variant is ``NAME[:SRC[:GRANIAN_JSON]]``: ``SRC`` is a directory holding an ``llmlb`` package
(empty: this checkout), ``GRANIAN_JSON`` extra ``Granian(...)`` options (see ``serve.py``).
Every variant proxies to the same mock backend; runs alternate between variants, rotating the
order each round, and the medians of CPU per request (robust to other load on the machine),
req/s and p50 are printed per workload.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Fleet, run_streams, run_wrk  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME[:SRC[:JSON]]")
    parser.add_argument("--workloads", default="chat-c32,chat-c1,stream-c32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds per run")
    parser.add_argument("--direct", action="store_true", help="also measure the bare backend")
    parser.add_argument("--out", type=Path, help="write the summary and every run here (JSON)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmlb-bench-ab-"))
    fleet = Fleet(workdir)
    results: dict[tuple[str, str], list] = {}
    every: list[dict] = []  # every run, counted or not, with the 1-min load after it
    load_before = list(os.getloadavg())
    try:
        direct = fleet.mock()
        setups = [direct] if args.direct else []
        for spec in args.variant:
            name, _, rest = spec.partition(":")
            src, _, granian = rest.partition(":")
            setups.append(fleet.router(direct.url, name, src or None, granian))
        for setup in setups:
            run_wrk(setup, 8, 2, 0, workdir)
        workloads = args.workloads.split(",")
        for rnd in range(1, args.rounds + 1):
            order = setups[rnd % len(setups) :] + setups[: rnd % len(setups)]
            for workload in workloads:
                kind, _, conc = workload.partition("-c")
                for setup in order:
                    if kind == "stream":
                        run = run_streams(setup, int(conc), args.duration, rnd)
                    else:
                        run = run_wrk(setup, int(conc), args.duration, rnd, workdir)
                    run.extra["load1"] = os.getloadavg()[0]
                    every.append(asdict(run))
                    if run.counted:
                        results.setdefault((setup.name, workload), []).append(run)
                    cpu = run.cpu_ms_per_req and round(run.cpu_ms_per_req, 4)
                    print(
                        f"r{rnd} {workload:10} {setup.name:10} rps={run.rps:8.0f} "
                        f"p50={run.p50_ms} cpu={cpu} ok={run.counted}",
                        flush=True,
                    )
    finally:
        fleet.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmedians ({args.rounds} rounds x {args.duration} s; load {os.getloadavg()[0]:.1f})")
    summary = {}
    for (name, workload), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):

        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        row = {
            "rps": med([r.rps for r in runs]),
            "p50_ms": med([r.p50_ms for r in runs]),
            "cpu_ms_per_req": med([r.cpu_ms_per_req for r in runs]),
        }
        summary[f"{workload} {name}"] = row
        print(
            f"{workload:10} {name:10} "
            + " ".join(f"{k}={v and round(v, 4)}" for k, v in row.items())
        )
    print(json.dumps(summary))
    if args.out:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(sys.argv),
            "rounds": args.rounds,
            "duration": args.duration,
            "load_before": load_before,
            "load_after": list(os.getloadavg()),
        }
        args.out.write_text(
            json.dumps({"meta": meta, "summary": summary, "runs": every}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
