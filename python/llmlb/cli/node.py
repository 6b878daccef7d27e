"""``llmlb node``: serve an inference node (Granian, ASGI, one worker)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import TYPE_CHECKING

from llmlb import config
from llmlb.cli.serving import add_bind_arguments
from llmlb.node.models.download.options import DEFAULT_CONNECTIONS
from llmlb.node.settings import DEFAULT_PEER_UPLOAD_MBPS

if TYPE_CHECKING:
    from llmlb.node.settings import NodeSettings

APP_FACTORY = "llmlb.node.api.app:app_from_env"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``node`` subcommand."""
    parser = subparsers.add_parser(
        "node",
        help="run an inference node (llama.cpp) that syncs models with a router",
        description="Run an inference node. Router and key default to LLMLB_ROUTER_URL and "
        "LLMLB_NODE_KEY; the model store follows --models-dir > XLLM_MODELS_DIR > "
        "LLM_MODELS_DIR > config.json > $LLMLB_HOME/models.",
    )
    parser.add_argument(
        "--router",
        default=None,
        help="router base URL, or several of one fleet as URL1,URL2 (default "
        f"LLMLB_ROUTER_URL or {config.DEFAULT_ROUTER_URL}); '' serves local models only",
    )
    parser.add_argument("--api-key", default=None, help="node-scope key (LLMLB_NODE_KEY)")
    add_bind_arguments(parser, config.DEFAULT_NODE_PORT)
    parser.add_argument(
        "--advertise-url",
        default="",
        help="URL the router uses to reach this node (default http://host:port)",
    )
    parser.add_argument("--models-dir", default=None, help="model store root")
    parser.add_argument(
        "--max-loaded", type=int, default=2, help="models resident in memory at once (2)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="parallel requests per model, advertised as slots (4)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="extra download host (repeatable; '*.example.com' = subdomains)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=10.0,
        help="seconds a request waits for a busy model before 429 (10)",
    )
    parser.add_argument(
        "--queue-depth",
        type=int,
        default=16,
        metavar="N",
        help="requests that may wait per model beyond its free slots; more get 429 at once "
        "(16; 0: none wait)",
    )
    parser.add_argument(
        "--ctx-size", type=int, default=4096, help="context length per request slot (4096)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=1024,
        help="answer length of a request that names no max_tokens (1024; never beyond "
        "the context)",
    )
    parser.add_argument(
        "--cache-ram",
        type=int,
        default=-1,
        metavar="MIB",
        help="host RAM for prompt states evicted from the slots, all models together "
        "(default: a quarter of the machine's memory, at most 8192; 0: off)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="decode threads (default: the cores this process may use)",
    )
    parser.add_argument(
        "--threads-batch",
        type=int,
        default=0,
        help="prompt-processing threads (default: as --threads)",
    )
    parser.add_argument(
        "--extra-buffer-types",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let ggml use its extra CPU buffer types (AMX, repacked weights), as llama.cpp "
        "does (default on; --no-extra-buffer-types where AMX kernels crash with SIGILL)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help=f"parallel range connections per downloaded file ({DEFAULT_CONNECTIONS})",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="re-read the router's whole registry this often, catching missed sync "
        "notifications (60)",
    )
    parser.add_argument(
        "--require-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (default LLMLB_NODE_REQUIRE_KEY; "
        "unset: open)",
    )
    parser.add_argument(
        "--store-all",
        action="store_true",
        help="also download models none of this node's runtimes serves (safetensors), "
        "for a node that holds models for others",
    )
    parser.add_argument(
        "--peer-upload-mbps",
        type=float,
        default=DEFAULT_PEER_UPLOAD_MBPS,
        metavar="MBPS",
        help="upload budget for serving model files to other nodes of the fleet, megabits/s "
        f"({DEFAULT_PEER_UPLOAD_MBPS:g}; 0 serves none)",
    )
    parser.add_argument(
        "--no-peer-fetch",
        action="store_true",
        help="download models from the hub only, never from other nodes",
    )
    parser.add_argument(
        "--router-auth",
        choices=("auto", "on", "off"),
        default="auto",
        help="accept /v1/* only with the router's per-node token (or --require-key): 'on', "
        "'off', or 'auto' (default: on unless --host is a loopback address)",
    )
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """Build :class:`llmlb.node.settings.NodeSettings` from parsed arguments.

    Raises:
        ValueError: an argument is out of range.
    """
    from llmlb.node.inference.engine import EngineOptions
    from llmlb.node.models.download.options import DownloadOptions
    from llmlb.node.settings import NodeSettings

    for name in ("max_loaded", "concurrency", "ctx_size", "connections", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threads", "threads_batch", "queue_depth"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.reconcile_interval <= 0:
        raise ValueError("--reconcile-interval must be > 0")
    if args.peer_upload_mbps < 0:
        raise ValueError("--peer-upload-mbps must be >= 0")
    router = ",".join(config.router_urls(args.router))
    return NodeSettings(
        router_url=router,
        api_key=args.api_key if args.api_key is not None else config.node_key(),
        host=args.host,
        port=args.port,
        advertise_url=args.advertise_url,
        models_dir=config.models_dir(args.models_dir),
        allowed_hosts=tuple(dict.fromkeys([*config.default_allowed_hosts(), *args.allow_host])),
        hf_token=config.hf_token(),
        engine=EngineOptions(
            max_loaded=args.max_loaded,
            concurrency=args.concurrency,
            queue_timeout_s=args.queue_timeout,
            queue_depth=args.queue_depth,
            n_ctx=args.ctx_size,
            max_tokens=args.max_tokens,
            threads=args.threads,
            threads_batch=args.threads_batch,
            extra_buffer_types=args.extra_buffer_types,
            cache_ram_bytes=(args.cache_ram if args.cache_ram >= 0 else default_cache_ram_mib())
            << 20,
        ),
        download=DownloadOptions(connections=args.connections),
        max_body_bytes=config.router_max_body_bytes(),
        heartbeat_interval_s=config.DEFAULT_HEARTBEAT_INTERVAL_S,
        reconcile_interval_s=args.reconcile_interval,
        require_key=args.require_key or config.node_require_key(),
        require_router_token=_router_auth(args.router_auth, args.host),
        store_all=args.store_all,
        peer_upload_mbps=args.peer_upload_mbps,
        peer_fetch=not args.no_peer_fetch,
    )


def _router_auth(mode: str, host: str) -> bool:
    """Whether ``/v1/*`` needs the router's token: ``auto`` means "reachable off this host"."""
    if mode != "auto":
        return mode == "on"
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def default_cache_ram_mib() -> int:
    """A quarter of this machine's memory, at most 8 GiB (llama.cpp's server default)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1024
    return int(min(8192, total // 4 // (1 << 20)))


# Seconds a stopping node's worker gets to finish before it is killed (SIGTERM → gone ≤ 3 s).
STOP_TIMEOUT_S = 2


def run(args: argparse.Namespace) -> int:
    """Serve the node until SIGINT/SIGTERM."""
    from llmlb.logs import configure_logging

    configure_logging()
    log = logging.getLogger("llmlb.node")
    try:
        settings = settings_from_args(args)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    from llmlb.node.settings import SETTINGS_ENV

    os.environ[SETTINGS_ENV] = settings.to_json()
    from granian import Granian
    from granian.constants import Interfaces

    log.info(
        "node on %s (store %s, router %s)",
        settings.url,
        settings.models_dir,
        settings.router_url or "none",
    )
    Granian(
        APP_FACTORY,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=1,
        factory=True,
        log_access=False,
        # answers still streaming (or a decode thread inside llama.cpp) never hold a stop
        # beyond this: the worker is killed, and its children die with it
        workers_kill_timeout=STOP_TIMEOUT_S,
    ).serve()
    return 0
