"""``llmlb up``: a router and one node (or ``--nodes N``) on loopback, keys, models, ready
to chat.

The router and the nodes run as child processes (``python -m llmlb.cli.main router|node``),
each leading its own process group and logging to ``$LLMLB_HOME/logs/``. Ctrl-C or SIGTERM
stops every group at once (SIGTERM, then SIGKILL after a short grace, so answers in flight
never hold it up); they also get SIGTERM if ``llmlb up`` itself is killed. Keys and the demo
models persist in ``$LLMLB_HOME``, so a second ``llmlb up`` reuses them.

One node uses the usual store (``$LLMLB_HOME/models``); with ``--nodes N`` node ``i`` has its
own store ``$LLMLB_HOME/nodes/<i>/models`` (the demo models hard-linked from the usual one)
and the port ``--node-port + i - 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from llmlb import config
from llmlb.cli import demo
from llmlb.cli.api_client import ApiClient, ApiClientError
from llmlb.cli.children import Child, stop_all
from llmlb.cli.progress import FleetDownloadDisplay, ModelProgress, progress_from_nodes
from llmlb.private_file import write_private_file

HOST = "127.0.0.1"
API_KEY_FILE = "api.key"
NODE_KEY_FILE = "node.key"
ADMIN_KEY_FILE = "admin.key"
START_TIMEOUT_S = 60.0
DEMO_READY_TIMEOUT_S = 180.0
POLL_S = 0.25
# The nodes `llmlb up` starts: requests served at once (a second client is never refused
# while a first one is answered) and, for the demo models, the answer length of a request
# that names no max_tokens (SmolLM2 ends its answers by itself, mostly within 100 tokens; the
# cap bounds the base Gemma, which never does, to a few seconds on two CPU cores).
NODE_SLOTS = 4
DEMO_MAX_TOKENS = 256
# Answer length the banner's examples allow (room for an answer to end by itself).
EXAMPLE_MAX_TOKENS = 128
EXAMPLE_PROMPT = "Write a haiku about load balancers."
MAX_NODES = 16


class UpError(Exception):
    """A failure ``llmlb up`` reports as one line, without a traceback."""


class _Stopped(Exception):
    """SIGINT/SIGTERM arrived; shut down."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``llmlb up``."""
    parser = subparsers.add_parser(
        "up",
        help="start a router and one node (or --nodes N) on loopback, serving a model",
        description="Start a router and one node on 127.0.0.1 under $LLMLB_HOME, create the "
        "keys they need, serve the demo models (the instruction-tuned SmolLM2-135M-Instruct "
        f"as {demo.DEMO_MODEL_ID}, and the base Gemma 3 270M as {demo.GEMMA_MODEL_ID}; "
        f"{DEMO_MAX_TOKENS}-token answers at most unless a request says) or --model ORG/REPO "
        "from the hub, and print how to call it. Ctrl-C stops everything; a second run reuses "
        "the same home, keys and models. Logs go to $LLMLB_HOME/logs/.",
    )
    parser.add_argument(
        "--model",
        metavar="ORG/REPO",
        help="register this hub model (and download it) instead of the demo models",
    )
    parser.add_argument("--filename", help="with --model: which GGUF of the repo to use")
    parser.add_argument(
        "--port",
        type=int,
        default=config.DEFAULT_ROUTER_PORT,
        help=f"router port (default {config.DEFAULT_ROUTER_PORT})",
    )
    parser.add_argument(
        "--node-port",
        type=int,
        default=config.DEFAULT_NODE_PORT,
        help=f"node port, the first one with --nodes (default {config.DEFAULT_NODE_PORT})",
    )
    parser.add_argument(
        "--nodes",
        type=_node_count,
        default=1,
        metavar="N",
        help=f"start N nodes (1 to {MAX_NODES}; default 1), each with its own store under "
        "$LLMLB_HOME/nodes/<i>/ and the ports after --node-port",
    )
    parser.set_defaults(func=run)


def _node_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_NODES}")
    return n


def run(args: argparse.Namespace) -> int:
    """Start everything, print how to use it, and supervise until a signal."""
    if args.filename and not args.model:
        return _fail("--filename needs --model")
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    children: list[Child] = []
    try:
        cluster = _Cluster(args, stop, children)
        cluster.start()
        cluster.supervise()
        return 0
    except UpError as exc:
        return _fail(str(exc))
    except _Stopped:
        return 0
    finally:
        if children:
            print("llmlb up: stopping…", file=sys.stderr, flush=True)
        stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(message: str) -> int:
    print(f"llmlb up: error: {message}", file=sys.stderr, flush=True)
    return 1


class _Cluster:
    """One ``llmlb up`` session: checks, children, keys, model, banner."""

    def __init__(self, args: argparse.Namespace, stop: threading.Event, children: list[Child]):
        self.args = args
        self.stop = stop
        self.children = children
        self.home = config.llmlb_home().absolute()
        self.router_url = f"http://{HOST}:{args.port}"
        self.node_count: int = getattr(args, "nodes", 1)
        self.node_ports = [args.node_port + i for i in range(self.node_count)]
        self.node_urls = [f"http://{HOST}:{port}" for port in self.node_ports]
        self.node_url = self.node_urls[0]
        self.models_dir = Path()
        self.api_key = ""
        self.model_id = ""
        self.model_ids: list[str] = []
        self.node_started_at = 0.0

    # -- start-up -----------------------------------------------------------------------

    def start(self) -> None:
        """Check the machine, start router and node, and wait for a ready model."""
        args = self.args
        _ensure_writable(self.home, "LLMLB_HOME")
        try:
            self.models_dir = config.models_dir(None)
        except ValueError as exc:
            raise UpError(str(exc)) from None
        _ensure_writable(self.models_dir, "the model store (XLLM_MODELS_DIR)")
        if args.port in self.node_ports:
            raise UpError(
                "--port and --node-port must differ"
                if args.port == args.node_port
                else f"--port {args.port} is one of the {self.node_count} node ports from "
                f"--node-port {args.node_port}"
            )
        if not (args.node_port > 0 and self.node_ports[-1] <= 65535):
            raise UpError(f"--node-port {args.node_port}: the node ports must lie in 1-65535")
        _ensure_port_free(args.port, "--port")
        for port in self.node_ports:
            _ensure_port_free(port, "--node-port")
        if not args.model:
            self._place_demo_models()
        self._check_stop()
        env = self._child_env()
        # One machine, its own node: zero configuration, so nodes are approved as they join.
        router_args = ["router", "--host", HOST, "--port", str(args.port)]
        self._spawn("router", [*router_args, "--node-approval", "auto"], env)
        self._wait(
            lambda: _http_ok(f"{self.router_url}/health"),
            START_TIMEOUT_S,
            "the router to answer /health",
        )
        admin = ApiClient(self.router_url, self._admin_key())
        self.api_key = _ensure_key(admin, self.home / API_KEY_FILE, "api", "/v1/models")
        node_key = _ensure_key(admin, self.home / NODE_KEY_FILE, "node", "/v0/models")
        if args.model:
            self.model_id = self._register(admin)
            self.model_ids = [self.model_id]
        else:
            self.model_id = demo.DEMO_MODEL_ID
            self.model_ids = list(demo.DEMO_MODEL_IDS)
        node_env = dict(env, LLMLB_NODE_KEY=node_key, LLMLB_ROUTER_URL=self.router_url)
        self.node_started_at = time.time()
        for i in range(self.node_count):
            name = "node" if self.node_count == 1 else f"node-{i + 1}"
            self._spawn(name, self._node_args(i), node_env)
        for model_id in self.model_ids:
            self._wait_model_ready(admin, model_id)
        self._print_banner(ApiClient(self.router_url, self.api_key))

    def node_store(self, index: int) -> Path:
        """Node ``index``'s store (0-based): the usual one for a single node, else its own."""
        if self.node_count == 1:
            return self.models_dir
        return self.home / "nodes" / str(index + 1) / "models"

    def _node_args(self, index: int = 0) -> list[str]:
        """The ``llmlb node`` command line: loopback, its store, demo-suited defaults."""
        argv = [
            "node",
            "--router",
            self.router_url,
            "--host",
            HOST,
            "--port",
            str(self.node_ports[index]),
            "--models-dir",
            str(self.node_store(index)),
            "--concurrency",
            str(NODE_SLOTS),
        ]
        if not self.args.model:
            argv += ["--max-tokens", str(DEMO_MAX_TOKENS)]
        if self.node_count > 1:
            # Nodes on one machine share its cores: llama.cpp's threads wait for each other
            # at every step, so more threads than cores makes every node crawl.
            argv += ["--threads", str(max(1, _usable_cores() // self.node_count))]
        return argv

    def _place_demo_models(self) -> None:
        """Place the demo models in the usual store, then link them into each node's own."""

        def say(line: str) -> None:
            print(f"llmlb up: {line}…", file=sys.stderr, flush=True)

        try:
            demo.place_demo_models(self.models_dir, say)
            if self.node_count > 1:
                for i in range(self.node_count):
                    store = self.node_store(i)
                    _ensure_writable(store, f"the store of node {i + 1}")
                    for model_id in demo.DEMO_MODEL_IDS:
                        _link_model(self.models_dir / model_id, store / model_id)
        except demo.DemoModelMissing as exc:
            raise UpError(str(exc)) from None
        except OSError as exc:
            raise UpError(f"cannot place the demo models in {self.models_dir}: {exc}") from None

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LLMLB_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, name: str, cli_args: list[str], env: dict[str, str]) -> Child:
        argv = [sys.executable, "-m", "llmlb.cli.main", *cli_args]
        child = Child(name, argv, self.home / "logs" / f"{name}.log", env)
        self.children.append(child)
        return child

    def _admin_key(self) -> str:
        key = config.admin_key()
        if key:
            return key
        path = self.home / ADMIN_KEY_FILE
        with contextlib.suppress(TimeoutError):
            self._wait(path.is_file, 5.0, f"{path}")
        try:
            return path.read_text().strip()
        except OSError:
            raise UpError(
                f"the router keeps an admin key but {path} is missing; set LLMLB_ADMIN_KEY"
            ) from None

    def _register(self, admin: ApiClient) -> str:
        body: dict[str, Any] = {"repo": self.args.model}
        if self.args.filename:
            body["filename"] = self.args.filename
        try:
            model = admin.post("/v1/models/register", body)
        except ApiClientError as exc:
            if exc.code != "model_exists":
                raise UpError(f"cannot register {self.args.model}: {exc}") from None
            model = {"id": _default_model_id(self.args.model)}
        return str(model["id"])

    def _wait_model_ready(self, admin: ApiClient, model_id: str) -> None:
        """Wait until every node we started reports ``model_id`` ready and the router lists
        it ready.

        Only nodes registered since this ``llmlb up`` started its nodes count: the router's
        database still holds what the previous run's nodes reported.
        """
        deadline = None if self.args.model else time.monotonic() + DEMO_READY_TIMEOUT_S
        reporter = FleetDownloadDisplay(model_id, prefix="llmlb up: ")
        try:
            while True:
                self._check_children()
                progress = _model_progress(admin, model_id, self.node_started_at)
                if progress.nodes_ready >= self.node_count and _model_ready(admin, model_id):
                    return
                if progress.failed:
                    raise UpError(f"model {model_id} failed on a node: {progress.error}")
                reporter.update(progress)
                if deadline is not None and time.monotonic() > deadline:
                    raise UpError(
                        f"model {model_id} was not ready after {DEMO_READY_TIMEOUT_S:.0f}s;"
                        f" see {self.home / 'logs'}"
                    )
                if self.stop.wait(POLL_S):
                    raise _Stopped
        finally:
            reporter.close()

    def _print_banner(self, client: ApiClient) -> None:
        try:
            listed = client.get("/v1/models").get("data", [])
        except ApiClientError as exc:
            raise UpError(str(exc)) from None
        ready = [m["id"] for m in listed if m.get("ready")]
        print("\n".join(self._banner_lines(ready)), flush=True)

    def _banner_lines(self, ready: list[str]) -> list[str]:
        """What ``llmlb up`` prints once the models are ready: where things are, how to call."""
        export = f"export LLMLB_ROUTER_URL={self.router_url}"
        if not config.admin_key():  # else LLMLB_ADMIN_KEY is already the admin key
            export += f" LLMLB_ADMIN_KEY=$(cat {shlex.quote(str(self.home / ADMIN_KEY_FILE))})"
        base = f"{self.router_url}/v1"
        key = self.api_key
        model = self.model_id
        n = EXAMPLE_MAX_TOKENS
        llmlb = _llmlb_command()
        chat = f"{llmlb} chat {shlex.quote(model)} {shlex.quote(EXAMPLE_PROMPT)}"
        chat += f" --max-tokens {n}"
        talk = f"{llmlb} chat {shlex.quote(model)} --verbose"
        if self.args.port != config.DEFAULT_ROUTER_PORT:
            chat += f" --router {self.router_url}"
            talk += f" --router {self.router_url}"
        count = self.node_count
        nodes = f"node {self.node_url}" if count == 1 else f"{count} nodes"
        lines = [
            "",
            f"llmlb is up: router {self.router_url}, {nodes}",
            f"  Base URL:  {base}",
            f"  API key:   {key} (kept in {self.home / API_KEY_FILE})",
            f"  Models:    {', '.join(ready) or '(none ready)'}",
            f"  Nodes:     {count} × {NODE_SLOTS} slots (requests served at once each): "
            + ", ".join(self.node_urls),
            f"  Home:      {self.home} (logs in {self.home / 'logs'})",
        ]
        if not self.args.model:
            lines += [
                "",
                f"{model} is SmolLM2-135M-Instruct: it follows short instructions and ends",
                "its answers by itself, but at 135M parameters its facts and reasoning are often",
                f"wrong. {demo.GEMMA_MODEL_ID} beside it is the base Gemma 3 270M: it continues "
                "text,",
                f"never ends a turn (answers stop at max_tokens, {DEMO_MAX_TOKENS} unless the "
                "request says).",
                "For better answers serve a bigger model: llmlb up --model ORG/REPO.",
            ]
        if count > 1:
            lines += [
                "",
                f"Watch the balancing: {llmlb} nodes ls (ACTIVE per node), and stop a node's",
                "process to see the router fail over to the others.",
            ]
        lines += [
            "",
            f"Manage it ({llmlb} models ls, nodes ls, keys ls) after:",
            f"  {export}",
            "",
            "Try it with curl:",
            f"  curl {base}/chat/completions \\",
            f'    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\',
            f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": '
            f'"{EXAMPLE_PROMPT}"}}], "max_tokens": {n}}}\'',
            "",
            "or with Python (pip install openai):",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{base}", api_key="{key}")',
            "  reply = client.chat.completions.create(",
            f'      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}],',
            f"      max_tokens={n})",
            "  print(reply.choices[0].message.content)",
            "",
            "or with the CLI (one question, or a conversation without one):",
            f"  {chat}",
            f"  {talk}",
            "",
            "Press Ctrl-C to stop.",
        ]
        return lines

    # -- supervision --------------------------------------------------------------------

    def supervise(self) -> None:
        """Block until a signal (then return) or a child's death (then raise)."""
        while not self.stop.wait(POLL_S):
            self._check_children()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                tail = child.log_tail()
                raise UpError(
                    f"the {child.name} exited with code {child.popen.returncode}"
                    f" (log: {child.log_path})" + (f"\n{tail}" if tail else "")
                )

    def _wait(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self._check_children()
            if time.monotonic() > deadline:
                raise UpError(f"timed out after {timeout:.0f}s waiting for {what}")
            if self.stop.wait(POLL_S):
                raise _Stopped


def _ensure_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UpError(
            f"{path} is not writable ({reason}); set {what} to a writable directory"
            if what == "LLMLB_HOME"
            else f"{what} {path} is not writable ({reason})"
        ) from None


def _ensure_port_free(port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: connections in TIME_WAIT do not make a port taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen(1)
        except OSError:
            raise UpError(
                f"port {port} on {HOST} is already in use; choose another with {flag}"
            ) from None


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _link_model(source: Path, target: Path) -> None:
    """Give ``target`` (a node's own store) the files of model directory ``source``: hard
    links, or copies across file systems; a complete copy already there is kept."""
    files = list(source.iterdir())
    if (
        target.is_dir()
        and sorted(p.name for p in target.iterdir()) == sorted(p.name for p in files)
        and all((target / p.name).stat().st_size == p.stat().st_size for p in files)
    ):
        return
    staging = target.with_name(f".{target.name}.linking-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for path in source.iterdir():
            try:
                os.link(path, staging / path.name)
            except OSError:
                shutil.copyfile(path, staging / path.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _ensure_key(admin: ApiClient, path: Path, scope: str, probe: str) -> str:
    """Reuse the key saved in ``path`` when the router still accepts it, else create one."""
    with contextlib.suppress(OSError):
        key = path.read_text().strip()
        if key:
            try:
                ApiClient(admin.base_url, key).get(probe)
                return key
            except ApiClientError as exc:
                if exc.status != 401:
                    raise UpError(f"checking the saved {scope} key: {exc}") from None
    try:
        created = admin.post("/v0/keys", {"scope": scope, "name": f"llmlb-up-{scope}"})
    except ApiClientError as exc:
        raise UpError(f"cannot create the {scope} key: {exc}") from None
    key = created["key"]
    write_private_file(path, key + "\n")
    return key


def _model_ready(admin: ApiClient, model_id: str) -> bool:
    try:
        return bool(admin.get(f"/v1/models/{model_id}").get("ready"))
    except ApiClientError as exc:
        if exc.status == 404:
            return False
        raise UpError(str(exc)) from None


def _model_progress(admin: ApiClient, model_id: str, since: float) -> ModelProgress:
    """The model's progress on the nodes that registered at or after ``since`` (epoch s)."""
    try:
        nodes = admin.get("/v0/nodes").get("nodes", [])
    except ApiClientError as exc:
        raise UpError(str(exc)) from None
    return progress_from_nodes([n for n in nodes if _registered_since(n, since)], model_id)


def _registered_since(node: dict[str, Any], since: float) -> bool:
    try:
        registered = datetime.fromisoformat(str(node.get("registered_at"))).timestamp()
    except ValueError:
        return True  # no usable timestamp: trust the node's own report
    return registered >= since - 1.0  # the router rounds to milliseconds


def _llmlb_command() -> str:
    """How to run this ``llmlb`` from a shell: ``llmlb`` when that is on PATH, else its path."""
    script = Path(sys.argv[0])
    if script.name == "llmlb" and script.is_file():
        found = shutil.which("llmlb")
        if found and Path(found).resolve() == script.resolve():
            return "llmlb"
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(sys.executable)} -m llmlb.cli.main"


def _default_model_id(repo: str) -> str:
    """The id the router gives ``repo`` when registered without an explicit id."""
    from llmlb.router.control.registry import RegisterRequest

    return RegisterRequest.parse({"repo": repo}).model_id
