"""Router CPU per request for prefix keys and their lookup (issue: at most +10 µs for a 4 KB
chat body, +50 µs for a 100 KB one).

Usage::

    .venv/bin/python bench/routing/keys.py [--rounds 7] [--out bench/results/prefix_keys.json]

For each body, the CPU time (``time.process_time``) of ``request_keys`` plus the index's
``longest`` over 8 nodes, one of which holds the whole chain, against the same chain
composed in Python from ``prefix_keys._chat_item`` (what the router ran before the walk
moved into the native extension). The sides alternate within each round; medians over
rounds. Bodies: 4 KB in 6 messages, 100 KB in 41, 100 KB in 201, and 100 KB in 201 whose
texts are not ASCII (one typographic apostrophe each, as model answers often hold).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from llmlb import prefix_keys
from llmlb.prefix_keys import CHAT, PrefixKeys, request_keys
from llmlb.router.proxy.prefix_index import PrefixIndex

MODEL = "org/model"
NODES = [f"node-{i}" for i in range(8)]


def _body(messages: int, total: int, *, apostrophe: bool = False) -> dict[str, Any]:
    per = total // messages
    text = ("word " * (per // 5 + 1))[:per]
    if apostrophe:
        text = "it\u2019s " + text[5:]
    roles = ["user", "assistant"]
    return {"model": MODEL, "messages": [{"role": "system", "content": text}] + [
        {"role": roles[i % 2], "content": text} for i in range(messages - 1)]}


def _python_keys(doc: dict[str, Any]) -> PrefixKeys:
    items = [prefix_keys._chat_item(m) for m in doc["messages"]]
    return prefix_keys._chain(prefix_keys._seed(doc["model"], doc.get("tools")), items)


def _cpu_us(work: Any, body: dict[str, Any], index: PrefixIndex, repeats: int) -> float:
    start = time.process_time()
    for _ in range(repeats):
        index.longest(MODEL, work(body), NODES)
    return (time.process_time() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="bench/results/prefix_keys.json")
    args = parser.parse_args()
    bodies = {
        "4 KB, 6 messages": _body(6, 4_000),
        "100 KB, 41 messages": _body(41, 100_000),
        "100 KB, 201 messages": _body(201, 100_000),
        "100 KB, 201 messages, not ASCII": _body(201, 100_000, apostrophe=True),
    }
    sides = {"native": lambda b: request_keys(CHAT, b), "python": _python_keys}
    load_before = os.getloadavg()
    rows = []
    for name, body in bodies.items():
        assert sides["native"](body) == sides["python"](body), name
        index = PrefixIndex()
        index.learn(NODES[0], MODEL, request_keys(CHAT, body))
        repeats = max(200, int(200_000 / len(orjson.dumps(body)) * 20))
        runs: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side, work in sides.items():
                runs[side].append(_cpu_us(work, body, index, repeats))
        rows.append({
            "body": name,
            "bytes": len(orjson.dumps(body)),
            "messages": len(body["messages"]),
            "runs_us": runs,
            "native_us": statistics.median(runs["native"]),
            "python_us": statistics.median(runs["python"]),
        })
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": args.rounds,
        "rows": rows,
    }
    with open(args.out, "w") as out:
        json.dump(result, out, indent=1)
    print(f"load {load_before[0]:.1f} -> {result['load_after'][0]:.1f}, {args.rounds} rounds")
    print("| body | keys + lookup, native (µs) | composed in Python (µs) | ratio |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['body']} ({row['bytes'] / 1000:.0f} KB) | {row['native_us']:.1f} | "
              f"{row['python_us']:.1f} | {row['native_us'] / row['python_us']:.2f}x |")


if __name__ == "__main__":
    main()
