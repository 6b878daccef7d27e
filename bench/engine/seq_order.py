"""How the order of sequence ids in a batch changes the cost of one ``llama_decode``.

Usage: ``.venv/bin/python bench/engine/seq_order.py [--rounds 4]``

The context the node creates for ``--concurrency 32 --ctx-size 1024`` (one KV stream per
sequence), every sequence holding a short prompt; then steps of one token per sequence in
different orders of ids, round-robin, timing ``llama_decode`` alone. llama.cpp computes only
runs of consecutive ids (``seq``, ``seq + 1``, …, in the batch's order) in one pass.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    from llmlb.node.inference.llama_native import Batch, Context, ContextShape, Model

    from tests.conftest import assemble_gemma

    model = Model(str(assemble_gemma()), gpu=False)
    ctx = Context(model, ContextShape(n_ctx=32 * 1024, n_seq=32, n_batch=2048, n_ubatch=512,
                                      n_outputs=32, threads=2, threads_batch=2))
    batch = Batch(2048)
    prompt = model.tokenize("Write a long, detailed story about a clockmaker.",
                            add_special=True, parse_special=False)
    for seq in range(32):
        batch.clear()
        for j, token in enumerate(prompt):
            batch.add(token, j, seq, j == len(prompt) - 1)
        assert ctx.decode(batch) == 0
    pos = [len(prompt)] * 32
    orders = {"32 in id order": list(range(32)), "32 reversed": list(range(31, -1, -1)),
              "32 shuffled": random.Random(1).sample(range(32), 32),
              "8 in id order": list(range(8)), "8 spread (0, 4, 8, ...)": list(range(0, 32, 4))}
    times: dict[str, list[float]] = {name: [] for name in orders}
    for _ in range(args.rounds):
        for name, seqs in orders.items():
            batch.clear()
            for seq in seqs:
                batch.add(100 + seq, pos[seq], seq, True)
                pos[seq] += 1
            started = time.perf_counter()
            assert ctx.decode(batch) == 0
            times[name].append(time.perf_counter() - started)
    for name, values in times.items():
        print(f"{name:24}: median {statistics.median(values) * 1000:8.1f} ms, "
              f"min {min(values) * 1000:8.1f} ms")
    ctx.close()
    model.close()


if __name__ == "__main__":
    main()
