"""A/B of two versions of the node's scheduler, in one process, on the real Gemma.

Usage::

    git show f7a2bdc~1:python/llmlb/node/inference/scheduler.py > /tmp/old_scheduler.py
    .venv/bin/python bench/engine/ab_scheduler.py /tmp/old_scheduler.py [--mode greedy]
        [--streams 32] [--rounds 3]

Two engines (``--concurrency 32 --ctx-size 1024``, as in ``run.py``), one with the scheduler
module given, one with the installed one, load the model; each round runs, on one then on the
other (the side that goes first alternating), a wave of 8 streams and one request of 16
tokens (so that the slots hold earlier answers and their last use differs, as in ``run.py``'s
sequence of cases), then the measured wave: ``--streams`` concurrent streaming completions of
64 tokens (EOS banned), driven through the OpenAI renderer without HTTP. Prints tokens/s per
round and side, the scheduler's steps and split steps, and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "local/gemma"
MODES = {
    "greedy": {"temperature": 0},
    "sampled": {"temperature": 0.8},
    "penalties": {"temperature": 0.8, "presence_penalty": 0.5, "frequency_penalty": 0.5},
}


async def wave(engine, path: str, streams: int, tokens: int, tag: str, mode: str) -> float:
    """``streams`` concurrent streamed completions of ``tokens`` tokens; tokens/s."""
    from llmlb.node.api import openai_response as openai_api

    async def one(i: int) -> None:
        body = {"prompt": f"Story {tag}-{i}. Write a long, detailed story about a clockmaker "
                          "who finds a mysterious letter.",
                "max_tokens": tokens, "stream": True, "logit_bias": {1: -100, 106: -100},
                **MODES[mode]}
        async for _ in await openai_api.complete(engine, MODEL, path, body):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    return streams * tokens / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    from llmlb.model_storage import ModelStorage
    from llmlb.node.inference import engine as engine_module
    from llmlb.node.inference.engine import Engine, EngineOptions
    from llmlb.node.inference.scheduler import Scheduler
    from llmlb.node.metrics import NodeMetrics

    from tests.conftest import assemble_gemma
    from tests.node_fixtures import place_model

    spec = importlib.util.spec_from_file_location("scheduler_a", args.old)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules["scheduler_a"] = old
    spec.loader.exec_module(old)
    store = Path(tempfile.mkdtemp(prefix="ab-scheduler-"))
    place_model(store, MODEL, assemble_gemma())
    storage = ModelStorage(store)
    path = str(storage.resolve(MODEL).primary_path)
    engines = {}
    for side, cls in (("old", old.Scheduler), ("new", Scheduler)):
        engine_module.Scheduler = cls  # type: ignore[misc]
        engine = Engine(storage, NodeMetrics(), EngineOptions(
            n_ctx=1024, concurrency=32, max_loaded=1, queue_timeout_s=600))
        await engine.load(MODEL, path)
        engines[side] = engine
    rates: dict[str, list[float]] = {"old": [], "new": []}
    for round_no in range(args.rounds):
        for side in ("old", "new") if round_no % 2 == 0 else ("new", "old"):
            engine = engines[side]
            await wave(engine, path, 8, 16, f"r{round_no}{side}w8", args.mode)
            await wave(engine, path, 1, 16, f"r{round_no}{side}w1", args.mode)
            stats = engine._models[MODEL].scheduler.stats  # noqa: SLF001
            steps, split = stats.steps, getattr(stats, "split_steps", 0)
            rate = await wave(engine, path, args.streams, 64, f"r{round_no}{side}", args.mode)
            rates[side].append(rate)
            print(f"round {round_no + 1} {side}: {args.mode} {args.streams}x64 {rate:.1f} tok/s; "
                  f"steps {stats.steps - steps}, split {getattr(stats, 'split_steps', 0) - split}"
                  f"; load {os.getloadavg()[0]:.2f}", flush=True)
    for side, values in rates.items():
        print(f"{side}: median {statistics.median(values):.1f} tok/s")
    print("new / old per round:", [round(n / o, 2) for n, o in zip(rates["new"], rates["old"],
                                                                   strict=True)])
    for engine in engines.values():
        await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the scheduler module to compare against")
    parser.add_argument("--mode", choices=sorted(MODES), default="greedy")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
