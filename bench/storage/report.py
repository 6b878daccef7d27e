"""The README's storage table from a pytest-benchmark JSON file.

    .venv/bin/python -m pytest bench/storage -p no:cacheprovider --benchmark-group-by=group \\
        --benchmark-json=bench/results/storage.json
    .venv/bin/python -m bench.storage.report bench/results/storage.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (pytest-benchmark group, README row label, unit, scale)
ROWS = (
    ("validate: 512-shard safetensors", "`validate` 512-shard safetensors", "ms", 1e3),
    ("resolve: 512-shard safetensors", "`resolve` 512-shard safetensors", "ms", 1e3),
    ("list_available: 1,000-model store", "`list_available` 1,000-model store", "ms", 1e3),
    ("resolve: one GGUF model", "`resolve` one GGUF model", "µs", 1e6),
)
IMPLS = ("native", "native-1-thread", "python")


def table(results: dict) -> str:
    """Min / median per implementation and the single-threaded speed-up, one row per group."""
    stats: dict[tuple[str, str], dict] = {}
    for bench in results["benchmarks"]:
        impl = bench["param"] if "param" in bench else bench["name"].split("[")[-1].rstrip("]")
        stats[(bench["group"], impl)] = bench["stats"]
    lines = [
        "| Operation (min / median) | native | native, 1 thread | Python reference "
        "| Speed-up (1 thread, min / median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for group, label, unit, scale in ROWS:
        cells = []
        for impl in IMPLS:
            s = stats.get((group, impl))
            cells.append(
                "–" if s is None else f"{s['min'] * scale:.1f} / {s['median'] * scale:.1f} {unit}"
            )
        one, ref = stats.get((group, "native-1-thread")), stats.get((group, "python"))
        ratio = "–"
        if one and ref:
            ratio = f"{ref['min'] / one['min']:.1f}x / {ref['median'] / one['median']:.1f}x"
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results = json.loads(Path(argv[1]).read_text())
    cpu = results.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    print(f"{results.get('datetime', '')}; {cpu}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
