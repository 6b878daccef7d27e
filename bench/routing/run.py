"""Routing benchmark: prefix-aware routing against p2c, LiteLLM's proxy and an oracle.

Usage::

    .venv/bin/python bench/routing/run.py [--quick] [--out bench/results/routing.json]
        [--skip-litellm] [--skip-llama]

A multi-tenant chat workload against real nodes serving the real Gemma 3 270M: ``T``
conversations, each with its own ~800-token system prompt, ``K`` turns each, a think time
of up to 1 s between turns, started staggered. Variants:

* ``own``: every tenant has its own system prompt, tenants ≤ the fleet's slots;
* ``shared``: every tenant has the same system prompt;
* ``skew``: one tenant sends half of all turns;
* ``control``: no reuse at all (every request a fresh prompt): what routing costs when
  there is nothing to gain.

Each variant runs through ``llmlb router`` with ``--routing prefix`` (the default) and
``--routing p2c``, through LiteLLM's proxy (``routing_strategy: least-busy``) in front of the
same nodes, and through an oracle client that sends conversation ``i`` straight to node
``i mod N``. Then one node alone against ``llama-server`` (its default ``--cache-ram``) with
3x more tenants than slots, same slots, context and threads. Reported per run: TTFT p50/p90
of turns 2+, requests/s, the share of turn 2+ prompt tokens served from cache (from the
answers' ``usage.prompt_tokens_details.cached_tokens``) and each node's share of requests.
The setups alternate within a round; ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.engine.build_server import ensure_server  # noqa: E402
from bench.engine.run import Server, free_port, llama_server, percentile  # noqa: E402

MODEL = "local/gemma"
ADMIN = "sk-bench-routing-admin"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_KEY = "sk-bench-litellm"
WORDS = (
    "harbour",
    "lamp",
    "ferry",
    "regatta",
    "festival",
    "engineer",
    "cannery",
    "choir",
    "breakwater",
    "storm",
    "market",
    "council",
    "gull",
    "tide",
    "quay",
    "sail",
)


def system_prompt(seed: int, words: int = 560) -> str:
    """About 800 tokens of deterministic, tenant-specific text."""
    rng = random.Random(seed)
    return f"Tenant {seed}. " + " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    node: str


@dataclass
class Workload:
    name: str
    tenants: int
    turns: int
    shared_system: bool = False
    skew: bool = False
    no_reuse: bool = False
    think_s: float = 1.0
    stagger_s: float = 0.3
    max_tokens: int = 12


@dataclass
class Result:
    setup: str
    workload: str
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        later = [t for t in self.turns if t.turn > 0]
        ttfts = [t.ttft for t in later] or [0.0]
        prompt = sum(t.prompt_tokens for t in later) or 1
        nodes: dict[str, int] = {}
        for t in self.turns:
            nodes[t.node] = nodes.get(t.node, 0) + 1
        mean = len(self.turns) / max(1, len(nodes))
        return {
            "setup": self.setup,
            "workload": self.workload,
            "requests": len(self.turns),
            "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p90_s": percentile(ttfts, 0.9),
            "requests_per_s": len(self.turns) / self.wall_s if self.wall_s else 0.0,
            "cached_share": sum(t.cached_tokens for t in later) / prompt,
            "node_shares": nodes,
            "max_node_share_vs_mean": max(nodes.values()) / mean if nodes else 0.0,
        }


async def chat(
    http: aiohttp.ClientSession, url: str, key: str | None, messages: list[dict], max_tokens: int
) -> tuple[float, dict, str, str]:
    """One streamed chat turn: TTFT, usage, the answer's text, the node that served it."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    first: float | None = None
    usage: dict = {}
    parts: list[str] = []
    for attempt in range(60):
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            if resp.status in (429, 503) and attempt < 59:
                await resp.read()
                await asyncio.sleep(float(resp.headers.get("Retry-After") or 1))
                continue
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
            node = (
                resp.headers.get("x-llmlb-node")
                or resp.headers.get("x-litellm-model-api-base")
                or url
            )
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                event = orjson.loads(line[5:].strip())
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        parts.append(text)
                        if first is None:
                            first = time.perf_counter()
            break
    ended = time.perf_counter()
    return (first or ended) - started, usage, "".join(parts), node


async def run_workload(
    setup: str, urls: list[str], key: str | None, work: Workload, seed: int
) -> Result:
    """Every conversation of ``work`` against ``urls`` (one URL: a router or proxy; several:
    the oracle's nodes, conversation i to node i mod N)."""
    result = Result(setup, work.name)
    rng = random.Random(f"{setup}/{work.name}/{seed}")
    salt = rng.randrange(1 << 40)
    schedule = list(range(work.tenants)) * work.turns
    if work.skew:  # tenant 0 sends as many turns as all the others together
        schedule += [0] * (len(schedule) - 2 * work.turns)
    turns_of = {c: schedule.count(c) for c in range(work.tenants)}
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def conversation(c: int) -> None:
            await asyncio.sleep(c * work.stagger_s)
            # prompts of their own per run: no run finds another's in a node's caches
            system = system_prompt(salt if work.shared_system else salt + c + 1)
            messages = [{"role": "system", "content": system}]
            url = urls[c % len(urls)]
            for turn in range(turns_of[c]):
                if work.no_reuse:
                    messages = [
                        {"role": "system", "content": system_prompt(rng.randrange(1 << 30))}
                    ]
                messages.append({"role": "user", "content": f"Question {turn}: what next?"})
                ttft, usage, text, node = await chat(http, url, key, messages, work.max_tokens)
                details = usage.get("prompt_tokens_details") or {}
                result.turns.append(
                    Turn(
                        c,
                        turn,
                        ttft,
                        int(usage.get("prompt_tokens") or 0),
                        int(details.get("cached_tokens") or 0),
                        node,
                    )
                )
                messages.append({"role": "assistant", "content": text})
                await asyncio.sleep(rng.uniform(0, work.think_s))

        await asyncio.gather(*(conversation(c) for c in range(work.tenants)))
    result.wall_s = time.perf_counter() - started
    return result


# -- the fleet --------------------------------------------------------------------------


def place(store: Path, gguf: Path) -> None:
    from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

    target = store / MODEL
    target.mkdir(parents=True, exist_ok=True)
    dest = target / gguf.name
    if not dest.exists():
        try:
            os.link(gguf, dest)
        except OSError:
            shutil.copyfile(gguf, dest)
    (target / "chat_template.jinja").write_text(GEMMA_CHAT_TEMPLATE)


def llmlb(*argv: str) -> list[str]:
    return [sys.executable, "-m", "llmlb.cli.main", *argv]


async def http_json(method: str, url: str, key: str, body: dict | None = None) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return await resp.json()


async def start_router(work: Path, routing: str, tag: str) -> tuple[Server, str, str]:
    """A router (SQLite, auto approval) and its node and api keys."""
    port = free_port()
    home = work / f"home-{tag}"
    env = {
        "LLMLB_HOME": str(home),
        "LLMLB_ADMIN_KEY": ADMIN,
        "LLMLB_NODE_APPROVAL": "auto",
        "LLMLB_HEARTBEAT_INTERVAL_S": "0.5",
    }
    router = Server(
        "router",
        llmlb("router", "--host", "127.0.0.1", "--port", str(port), "--routing", routing),
        port,
        "/health",
        work / f"router-{tag}.log",
        env=env,
    )
    await router.start()
    node_key = (await http_json("POST", router.url + "/v0/keys", ADMIN, {"scope": "node"}))["key"]
    api_key = (await http_json("POST", router.url + "/v0/keys", ADMIN, {"scope": "api"}))["key"]
    return router, node_key, api_key


def node(
    work: Path, store: Path, router_url: str, node_key: str | None, slots: int, ctx: int, tag: str
) -> Server:
    port = free_port()
    argv = llmlb(
        "node",
        "--router",
        router_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models-dir",
        str(store),
        "--concurrency",
        str(slots),
        "--ctx-size",
        str(ctx),
        "--queue-timeout",
        "120",
        "--threads",
        "1",
    )
    if node_key:
        argv += ["--api-key", node_key]
    return Server(
        "node",
        argv,
        port,
        "/ready",
        work / f"node-{tag}.log",
        env={"LLMLB_HOME": str(work / f"nodehome-{tag}")},
    )


async def wait_routed(url: str, key: str, nodes: int) -> None:
    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(
                url + "/v0/nodes", headers={"Authorization": f"Bearer {ADMIN}"}
            ) as r:
                listed = await r.json() if r.status == 200 else {}
            entries = listed.get("nodes", listed) if isinstance(listed, dict) else listed
            ready = [
                n
                for n in entries or []
                if any(m.get("state") == "ready" for m in n.get("models", []))
            ]
            if len(ready) >= nodes:
                return
            await asyncio.sleep(0.3)
    raise TimeoutError("nodes never became ready on the router")


def litellm(work: Path, nodes: list[str]) -> Server:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print("installing litellm[proxy] into", LITELLM_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True
        )
    lines = ["model_list:"]
    for url in nodes:
        lines += [
            f"  - model_name: {MODEL}",
            "    litellm_params:",
            "      model: openai/" + MODEL,
            f"      api_base: {url}/v1",
            "      api_key: sk-unused",
        ]
    lines += [
        "router_settings:",
        "  routing_strategy: least-busy",
        "general_settings:",
        f"  master_key: {LITELLM_KEY}",
        "litellm_settings:",
        "  telemetry: false",
    ]
    config = work / "litellm.yaml"
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY_DISABLED": "true",
        "LITELLM_LOG": "ERROR",
    }
    argv = [
        str(exe),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    return Server("litellm", argv, port, "/health/liveliness", work / "litellm.log", env=env)


# -- the plan ---------------------------------------------------------------------------


def workloads(quick: bool, slots_total: int) -> list[Workload]:
    tenants = slots_total - 2 if not quick else 2
    turns = 4 if not quick else 2
    return [
        Workload("own", tenants, turns),
        Workload("shared", tenants, turns, shared_system=True),
        Workload("skew", tenants, turns, skew=True),
        Workload("control", tenants, turns, no_reuse=True),
    ]


async def fleet_runs(args: argparse.Namespace, work: Path, gguf: Path) -> list[dict]:
    slots, ctx, n_nodes = args.slots, args.ctx_size, 2
    summaries: list[dict] = []
    setups: list[tuple[str, list[Server], list[str], str | None]] = []
    servers: list[Server] = []
    try:
        for routing in ("prefix", "p2c"):
            router, node_key, api_key = await start_router(work, routing, routing)
            servers.append(router)
            fleet = []
            for i in range(n_nodes):
                store = work / f"store-{routing}-{i}"
                place(store, gguf)
                server = node(work, store, router.url, node_key, slots, ctx, f"{routing}-{i}")
                await server.start()
                servers.append(server)
                fleet.append(server)
            await wait_routed(router.url, api_key, n_nodes)
            setups.append((f"llmlb {routing}", fleet, [router.url], api_key))
        oracle_nodes = setups[0][1]  # the prefix fleet's nodes, spoken to directly
        setups.append(("oracle", oracle_nodes, [n.url for n in oracle_nodes], None))
        if not args.skip_litellm:
            proxy = litellm(work, [n.url for n in setups[1][1]])
            await proxy.start(timeout=300)
            servers.append(proxy)
            setups.append(("litellm least-busy", setups[1][1], [proxy.url], LITELLM_KEY))
        plan = workloads(args.quick, slots * n_nodes)
        for round_no in range(args.rounds):
            for work_item in plan:
                order = setups if round_no % 2 == 0 else list(reversed(setups))
                for name, _, urls, key in order:
                    seed = 1000 * round_no + hash(work_item.name) % 1000
                    result = await run_workload(name, urls, key, work_item, seed)
                    summary = result.summary() | {"round": round_no}
                    summaries.append(summary)
                    print(json.dumps(summary), flush=True)
    finally:
        for server in reversed(servers):
            server.stop()
    return summaries


async def single_node_runs(args: argparse.Namespace, work: Path, gguf: Path) -> list[dict]:
    """One node against llama-server, 3x more tenants than slots."""
    from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE

    slots, ctx = 2, args.ctx_size * 2
    binary = ensure_server()
    template = work / "template.jinja"
    template.write_text(GEMMA_CHAT_TEMPLATE)
    store = work / "store-single"
    place(store, gguf)
    threads = 1
    summaries = []
    work_item = Workload("3x tenants", 3 * slots, 2 if args.quick else 4)
    for round_no in range(args.rounds):
        sides = ["node", "llama"] if round_no % 2 == 0 else ["llama", "node"]
        for side in sides:
            if side == "node":
                server = node(work, store, "", None, slots, ctx, f"single-{round_no}")
            else:
                server = llama_server(binary, work, gguf, template, slots, ctx, threads, round_no)
            await server.start()
            try:
                result = await run_workload(side, [server.url], None, work_item, round_no)
            finally:
                server.stop()
            summary = result.summary() | {"round": round_no}
            summaries.append(summary)
            print(json.dumps(summary), flush=True)
    return summaries


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(rows: list[dict]) -> str:
    out = [
        "| workload | setup | TTFT p50 (s) | TTFT p90 (s) | req/s | cached share "
        "| max node share / mean |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["setup"]), []).append(row)
    for (workload, setup), group in groups.items():
        out.append(
            f"| {workload} | {setup} | {med(group, 'ttft_p50_s'):.2f} "
            f"| {med(group, 'ttft_p90_s'):.2f} "
            f"| {med(group, 'requests_per_s'):.2f} | {med(group, 'cached_share'):.0%} "
            f"| {med(group, 'max_node_share_vs_mean'):.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tenants, 2 turns, 1 round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slots", type=int, default=4, help="slots per node (fleet runs)")
    parser.add_argument("--ctx-size", type=int, default=2048)
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.conftest import assemble_gemma

    gguf = assemble_gemma()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        work = Path(tmp)
        rows = asyncio.run(fleet_runs(args, work, gguf))
        if not args.skip_llama:
            rows += asyncio.run(single_node_runs(args, work, gguf))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(render(rows))
    print(f"load average before {load_before}, after {report['load_after']}; raw: {args.out}")


if __name__ == "__main__":
    main()
