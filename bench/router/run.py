"""Router proxy benchmark: a fast mock OpenAI backend measured direct, through llmlb's router and
through LiteLLM's proxy, with ``wrk`` (non-streaming, c=1/32/64) and an asyncio SSE client
(streaming, c=32). Runs alternate between setups; a run with any non-2xx answer or socket error
does not count. Proxy CPU comes from ``/proc/<pid>/stat`` summed over the process tree.

    python bench/router/run.py [--duration 10] [--rounds 2] [--skip-litellm] [--update-readme]

Needs ``wrk`` on PATH (``apt-get install wrk``). LiteLLM (``litellm[proxy]``) is installed into
``bench/.venv-litellm`` on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
README = ROOT / "bench" / "README.md"
SECTION = "## Router proxy"
MODEL = "mock/model"
ADMIN_KEY = "sk-bench-admin"
LITELLM_KEY = "sk-bench-litellm"
PROMPT = {"role": "user", "content": "Say hello in one short sentence."}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while http("GET", url)[0] != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout}s")
        time.sleep(0.2)


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                stack.extend(int(child) for child in children)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total / CLK_TCK


@dataclass
class Setup:
    """One way to reach the backend: a URL, a key, the model name, the process to meter."""

    name: str
    url: str
    key: str | None
    model: str
    pid: int | None


@dataclass
class Run:
    setup: str
    workload: str
    concurrency: int
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    errors: int = 0
    cpu_ms_per_req: float | None = None
    counted: bool = True
    extra: dict = field(default_factory=dict)


# -- processes -----------------------------------------------------------------------------


class Fleet:
    """The processes under test; stopped on exit."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self._stop = threading.Event()

    def spawn(self, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def mock(self) -> Setup:
        port = free_port()
        proc = self.spawn(
            [sys.executable, str(HERE / "mock_backend.py"), "--port", str(port)], "mock"
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        return Setup("direct", url, None, MODEL, proc.pid)

    def router(
        self, backend: str, name: str = "llmlb", src: str | None = None, granian: str = ""
    ) -> Setup:
        """Start a router (1 worker) with the mock as its one ready node; ``src`` and
        ``granian`` run another source tree or extra Granian options (``serve.py``)."""
        port = free_port()
        home = self.workdir / f"{name}-home"
        env = {"LLMLB_HOME": str(home), "LLMLB_ADMIN_KEY": ADMIN_KEY}
        env["LLMLB_NODE_APPROVAL"] = "auto"  # the bench's nodes serve at once
        argv = [sys.executable, "-m", "llmlb.cli.main"]
        if src or granian:
            argv = [sys.executable, str(HERE / "serve.py"), "--granian", granian or "{}"]
            argv += ["--src", src] if src else []
            argv += ["--"]
        argv += ["router", "--port", str(port), "--workers", "1"]
        proc = self.spawn(argv, name, env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        node = {
            "node_id": "mock-node",
            "url": backend,
            "runtimes": ["llama_cpp"],
            "gpu": {"backend": "cpu"},
            "slots": 4096,
            "models": [{"id": MODEL, "state": "ready"}],
        }
        status, body = http("POST", url + "/v0/nodes", node, ADMIN_KEY)
        assert status in (200, 201), (status, body)
        beat = {"slots": 4096, "models": [{"id": MODEL, "state": "ready"}]}

        def heartbeat() -> None:
            while not self._stop.wait(1.0):
                http("POST", url + "/v0/nodes/mock-node/heartbeat", beat, ADMIN_KEY)

        threading.Thread(target=heartbeat, daemon=True).start()
        status, body = http("POST", url + "/v0/keys", {"scope": "api", "name": "bench"}, ADMIN_KEY)
        assert status == 201, (status, body)
        key = json.loads(body)["key"]
        deadline = time.monotonic() + 30
        while http("POST", url + "/v1/chat/completions", {"model": MODEL}, key)[0] != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("router never routed to the mock node")
            time.sleep(0.2)
        return Setup(name, url, key, MODEL, proc.pid)

    def litellm(self, backend: str) -> Setup:
        exe = LITELLM_VENV / "bin" / "litellm"
        if not exe.exists():
            print("installing litellm[proxy] into", LITELLM_VENV, flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
            pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"]
            subprocess.run(pip, check=True)
        config = self.workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            "      model: openai/mock\n"
            f"      api_base: {backend}/v1\n"
            "      api_key: sk-unused\n"
            "general_settings:\n"
            f"  master_key: {LITELLM_KEY}\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
        )
        port = free_port()
        env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY_DISABLED": "true",
            "LITELLM_LOG": "ERROR",
        }
        argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        proc = self.spawn([*argv, "--num_workers", "1"], "litellm", env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health/liveliness", proc, timeout=300)
        return Setup("litellm", url, LITELLM_KEY, MODEL, proc.pid)

    def stop(self) -> None:
        self._stop.set()
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


# -- load generators -----------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def run_wrk(setup: Setup, concurrency: int, duration: float, rnd: int, workdir: Path) -> Run:
    body = json.dumps({"model": setup.model, "messages": [PROMPT], "max_tokens": 16})
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if setup.key:
        headers += f'wrk.headers["Authorization"] = "Bearer {setup.key}"\n'
    script = workdir / f"wrk-{setup.name}.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n{headers}')
    seconds = max(1, round(duration))
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "--latency"]
    cpu0 = tree_cpu_s(setup.pid) if setup.pid else 0.0
    out = subprocess.run(
        [*argv, "-s", str(script), setup.url + "/v1/chat/completions"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = (tree_cpu_s(setup.pid) - cpu0) if setup.pid else 0.0
    requests_, seconds = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).groups()[:2]
    requests = int(requests_)
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = sum(int(x) for x in m.groups())
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return Run(
        setup.name,
        "chat",
        concurrency,
        rnd,
        requests,
        float(seconds),
        rps,
        p50,
        p99,
        non_2xx,
        errors,
        cpu * 1e3 / requests if requests else None,
        counted=non_2xx == 0 and errors == 0 and requests > 0,
    )


async def _streams(setup: Setup, concurrency: int, duration: float) -> tuple[int, int, float]:
    import aiohttp

    body = json.dumps({"model": setup.model, "messages": [PROMPT], "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    if setup.key:
        headers["Authorization"] = f"Bearer {setup.key}"
    done = errors = 0
    stop_at = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < stop_at:
                try:
                    async with session.post(
                        setup.url + "/v1/chat/completions", data=body, headers=headers
                    ) as resp:
                        # Read as it arrives, check the events at the end: splitting lines in
                        # the client would cost more CPU than the proxy under test.
                        parts = [chunk async for chunk in resp.content.iter_any()]
                        text = b"".join(parts)
                        events = text.count(b"data: ")
                        ended = text.rstrip().endswith(b"data: [DONE]")
                        if resp.status == 200 and events >= 20 and ended:
                            done += 1
                        else:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, errors, time.monotonic() - started


def run_streams(setup: Setup, concurrency: int, duration: float, rnd: int) -> Run:
    cpu0 = tree_cpu_s(setup.pid) if setup.pid else 0.0
    done, errors, seconds = asyncio.run(_streams(setup, concurrency, duration))
    cpu = (tree_cpu_s(setup.pid) - cpu0) if setup.pid else 0.0
    return Run(
        setup.name,
        "stream",
        concurrency,
        rnd,
        done,
        seconds,
        done / seconds,
        non_2xx=errors,
        cpu_ms_per_req=cpu * 1e3 / done if done else None,
        counted=errors == 0 and done > 0,
    )


# -- report --------------------------------------------------------------------------------


def summarise(runs: list[Run]) -> dict:
    """Median over counted rounds per (setup, workload, concurrency)."""
    summary: dict = {}
    for run in runs:
        if not run.counted:
            continue
        key = f"{run.workload}-c{run.concurrency}"
        slot = summary.setdefault(run.setup, {}).setdefault(key, {"rps": [], "p50": [], "cpu": []})
        slot["rps"].append(run.rps)
        if run.p50_ms is not None:
            slot["p50"].append(run.p50_ms)
        if run.cpu_ms_per_req is not None:
            slot["cpu"].append(run.cpu_ms_per_req)
    for workloads in summary.values():
        for key, slot in workloads.items():
            workloads[key] = {k: statistics.median(v) if v else None for k, v in slot.items()}
    return summary


def _fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(summary: dict) -> str:
    def get(setup: str, key: str, metric: str) -> float | None:
        return summary.get(setup, {}).get(key, {}).get(metric)

    lines = [
        "| setup | req/s c=1 | p50 ms c=1 | req/s c=32 | req/s c=64 | streams/s c=32 "
        "| proxy CPU ms/req (c=32) | proxy CPU ms/stream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in ("direct", "llmlb", "litellm"):
        if setup not in summary:
            continue
        cpu = get(setup, "chat-c32", "cpu")
        stream_cpu = get(setup, "stream-c32", "cpu")
        note = " (backend)" if setup == "direct" else ""
        lines.append(
            f"| {setup} | {_fmt(get(setup, 'chat-c1', 'rps'))} "
            f"| {_fmt(get(setup, 'chat-c1', 'p50'), 2)} "
            f"| {_fmt(get(setup, 'chat-c32', 'rps'))} | {_fmt(get(setup, 'chat-c64', 'rps'))} "
            f"| {_fmt(get(setup, 'stream-c32', 'rps'))} "
            f"| {_fmt(cpu, 3)}{note} | {_fmt(stream_cpu, 3)}{note} |"
        )
    derived = []
    lb, lite, direct = (
        summary.get("llmlb", {}),
        summary.get("litellm", {}),
        summary.get("direct", {}),
    )
    if lb and direct and lb.get("chat-c1", {}).get("p50") and direct.get("chat-c1", {}).get("p50"):
        added = lb["chat-c1"]["p50"] - direct["chat-c1"]["p50"]
        derived.append(f"added median latency at c=1 over direct: {added:.3f} ms")
    if lb and lite:
        for key in ("chat-c32", "chat-c64", "stream-c32"):
            a, b = lb.get(key, {}).get("rps"), lite.get(key, {}).get("rps")
            if a and b:
                derived.append(f"llmlb / LiteLLM {key}: {a / b:.0f}x")
        a, b = lb.get("chat-c32", {}).get("cpu"), lite.get("chat-c32", {}).get("cpu")
        if a and b:
            derived.append(f"CPU per request, LiteLLM / llmlb: {b / a:.0f}x")
    return "\n".join(lines) + ("\n\n" + "; ".join(derived) + "." if derived else "")


def update_readme(markdown: str, meta: dict) -> None:
    """Write (or replace) this benchmark's section of ``bench/README.md``, leaving the rest."""
    intro = (
        "A fast mock OpenAI backend (Granian, raw ASGI, ~300-byte completion, 20-event stream) "
        "measured direct, through llmlb's router (1 worker, api-key auth, balancing and metrics "
        "on, the mock registered as a ready node with a heartbeat) and through LiteLLM's proxy "
        "(`litellm[proxy]` in `bench/.venv-litellm`, 1 worker, master key). Non-streaming with "
        "`wrk -t1` at c=1/32/64, streaming with an asyncio client at c=32; setups alternate, "
        "runs with any non-2xx or socket error are discarded, figures are medians over rounds. "
        "Proxy CPU is user+system time of the proxy's process tree from `/proc/<pid>/stat` per "
        "request (= CPU-seconds per 1,000 requests). Targets: llmlb >= 50x LiteLLM's req/s and "
        "streams/s, <= 0.25 ms router CPU per request, <= 0.5 ms added to the median at c=1."
    )
    notes = (
        "How the figures got here (A/B of both versions in one run, `bench/router/ab.py`, "
        "3 rounds x 4 s, load ~3.5): the node connections moved from `aiohttp.ClientSession` "
        "to `llmlb.router.upstream.NodePool`, a keep-alive HTTP/1.1 client on an "
        "`asyncio.Protocol` (aiohttp's request/response objects, header multidicts and timers "
        "were ~40% of the worker's event-loop time): router CPU per request at c=32 0.285 -> "
        "0.111 ms, req/s 2,509 -> 4,863, p50 at c=1 0.741 -> 0.373 ms (direct 0.111), CPU per "
        "stream 0.445 -> 0.327 ms. Granian options tried the same way (`runtime_mode` st, "
        "`task_impl` rust, `http` 1) stayed within the +-10% noise, so the defaults stay; "
        "Granian's default `loop` (auto) already runs uvloop. What is left per request is "
        "mostly not Python: `epoll`/`write`/`read` system calls to the client and the node "
        "(about a third of the worker's loop time), Granian's hand-over of each request and "
        "`send` between its Rust threads and the Python loop, and ~0.05 ms of the router's own "
        "Python (auth, parse, balance, metrics, relay). Streams/s is bounded by the machine: "
        "the load generator, the mock and the router share 2 cores (the mock alone, direct, "
        "does ~2,300 streams/s)."
    )
    caveat = (
        f"Measured {meta['date']} on {meta['machine']}; {meta['rounds']} round(s) of "
        f"{meta['duration']} s per run. A load average above the core count means other work "
        "shared the CPUs: such figures are indicative only. Raw runs: "
        "`bench/router/results.json`."
    )
    body = (
        f"{SECTION}\n\n{textwrap.fill(intro, 95)}\n\n"
        "```bash\n.venv/bin/python bench/router/run.py --update-readme\n```\n\n"
        f"{markdown}\n\n{textwrap.fill(notes, 95)}\n\n{textwrap.fill(caveat, 95)}\n"
    )
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    README.write_text(text)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({cpu}), load average {load:.1f} at start"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all setups (2)")
    parser.add_argument("--skip-litellm", action="store_true", help="only direct and llmlb")
    parser.add_argument("--update-readme", action="store_true", help="rewrite bench/README.md")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the table from --out, run nothing"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.read_text())
        markdown = table(saved["summary"])
        print(markdown)
        if args.update_readme:
            update_readme(markdown, saved["meta"])
        return 0
    if not shutil.which("wrk"):
        print("wrk is required: apt-get install wrk", file=sys.stderr)
        return 2
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "rounds": args.rounds,
        "duration": args.duration,
    }
    workdir = Path(tempfile.mkdtemp(prefix="llmlb-bench-router-"))
    fleet = Fleet(workdir)
    runs: list[Run] = []
    try:
        direct = fleet.mock()
        setups = [direct, fleet.router(direct.url)]
        if not args.skip_litellm:
            setups.append(fleet.litellm(direct.url))
        for setup in setups:  # warm-up, not counted
            run_wrk(setup, 8, 2, 0, workdir)
        for rnd in range(1, args.rounds + 1):
            order = setups[rnd % len(setups) :] + setups[: rnd % len(setups)]
            for concurrency in (1, 32, 64):
                for setup in order:
                    run = run_wrk(setup, concurrency, args.duration, rnd, workdir)
                    runs.append(run)
                    print(json.dumps(asdict(run)), flush=True)
            for setup in order:
                run = run_streams(setup, 32, args.duration, rnd)
                runs.append(run)
                print(json.dumps(asdict(run)), flush=True)
    finally:
        fleet.stop()
    summary = summarise(runs)
    markdown = table(summary)
    args.out.write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs]}, indent=1)
    )
    print(markdown)
    if args.update_readme:
        update_readme(markdown, meta)
    discarded = [r for r in runs if not r.counted]
    if discarded:
        print(f"{len(discarded)} run(s) discarded for errors", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
