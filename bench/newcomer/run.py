"""Newcomer benchmark: how long the README's first steps take, as a newcomer runs them.

Each run starts ``llmlb up`` in a fresh home (a temporary directory, free ports) and times:
the start to its banner, then each example the README and the banner print (curl, ``llmlb
chat``, the Python snippet, …) run as written while one long answer streams all along, then
Ctrl-C with that generation in flight until every process is gone and both ports are free.
The steps and their checks are ``tests/integration/test_newcomer.py``'s, which only bounds
them against a hang; the README's promises ("answers within seconds", "stops … within about
3 seconds") are the targets printed here.

    .venv/bin/python bench/newcomer/run.py                 # 3 runs, a table on stdout
    .venv/bin/python bench/newcomer/run.py --runs 5 --out bench/results/newcomer.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.integration.test_newcomer import (  # noqa: E402
    HANG_S,
    LongAnswer,
    ctrl_c,
    examples,
    run_example,
    start_newcomer,
)
from tests.procs import spawner  # noqa: E402

ANSWER_TARGET_S = 10.0  # each example, copied as printed, answers within seconds
STOP_TARGET_S = 3.0  # Ctrl-C to nothing left
START = "llmlb up → banner"
STOP = "Ctrl-C → all gone"


def one_run(root: Path) -> dict[str, float]:
    """Seconds per step of one newcomer session in ``root``."""
    start, stop_all = spawner(root)
    took: dict[str, float] = {}
    try:
        began = time.monotonic()
        newcomer = start_newcomer(start, root)
        took[START] = time.monotonic() - began
        long_answer = LongAnswer(newcomer.port, newcomer.api_key)
        assert long_answer.first_chunk.wait(HANG_S) and long_answer.status == 200
        for example in examples(newcomer, root):
            out, took[example.what] = run_example(
                example.argv, example.env, example.what, example.stdin
            )
            example.check(out)
        _answer, took[STOP] = ctrl_c(newcomer, long_answer)
    finally:
        stop_all()
    return took


def target(step: str) -> float | None:
    """The README's promise for ``step`` in seconds (``None``: it makes none)."""
    if step == START:
        return None
    return STOP_TARGET_S if step == STOP else ANSWER_TARGET_S


def table(runs: list[dict[str, float]]) -> str:
    """Markdown: median (min–max) per step, against its target."""
    lines = ["| Step | Seconds, median (min–max) | Target | Met |", "|---|---:|---:|---|"]
    for step in runs[0]:
        values = [run[step] for run in runs]
        goal = target(step)
        met = "" if goal is None else ("yes" if max(values) < goal else "no")
        lines.append(
            f"| {step} | {statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f}) "
            f"| {'' if goal is None else f'< {goal:.0f}'} | {met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llmlb newcomer benchmark")
    parser.add_argument("--runs", type=int, default=3, help="fresh sessions (3)")
    parser.add_argument("--out", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    runs = []
    for number in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="llmlb-newcomer-") as tmp:
            runs.append(one_run(Path(tmp)))
        print(f"run {number}/{args.runs}: " + ", ".join(
            f"{step} {seconds:.2f}s" for step, seconds in runs[-1].items()), flush=True)
    print()
    print(table(runs))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(orjson.dumps({
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpus": len(os.sched_getaffinity(0)),
                        "platform": platform.platform()},
            "targets": {"answer_s": ANSWER_TARGET_S, "stop_s": STOP_TARGET_S},
            "runs": runs,
        }, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
