"""``llmlb router``: serve the router (Granian, ASGI) on the app factory."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

from llmlb import config
from llmlb.cli.serving import add_bind_arguments

if TYPE_CHECKING:
    from llmlb.router.control.settings import RouterSettings
    from llmlb.router.proxy.proxy import ProxySettings

APP_FACTORY = "llmlb.router.api.app:create_app"
# Seconds a worker gets to finish in-flight requests at shutdown before it is killed.
WORKERS_KILL_TIMEOUT_S = 10
# Connections per worker Granian serves beyond the inference limit: room for the requests the
# app sheds (503 overloaded) and for /health, heartbeats and admin routes, which must never
# wait behind inference traffic in Granian's own queue.
CONTROL_BUDGET = 4096
LISTEN_BACKLOG = 4096


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``router`` subcommand."""
    parser = subparsers.add_parser(
        "router",
        help="run the router (registry, keys, load-balancing proxy)",
        description="Run the router under $LLMLB_HOME (LLMLB_ADMIN_KEY fixes the admin key).",
    )
    add_bind_arguments(parser, config.DEFAULT_ROUTER_PORT)
    parser.add_argument(
        "--db",
        help="SQLite file (default LLMLB_ROUTER_DB, config.json db, $LLMLB_HOME/lb.db), or "
        "postgresql://USER@HOST:PORT/DB for several routers sharing one database",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    parser.add_argument(
        "--max-inflight",
        type=int,
        metavar="N",
        help="inference requests each worker takes at once; more get 503 overloaded "
        "(default 2048; proxy setting max_inflight)",
    )
    parser.add_argument(
        "--stream-idle-timeout",
        type=float,
        metavar="S",
        help="end a stream whose node sends nothing for S seconds (default 60; proxy "
        "setting stream_idle_timeout_s)",
    )
    parser.add_argument(
        "--node-approval",
        choices=config.NODE_APPROVAL_MODES,
        help="manual: a node id never approved joins pending (no client traffic, no peer "
        "token, in no peer list) until an admin approves it (`llmlb nodes approve ID`); auto: "
        "every node is approved as it registers (default LLMLB_NODE_APPROVAL, config.json "
        "node_approval, else manual)",
    )
    parser.add_argument(
        "--routing",
        choices=config.ROUTING_POLICIES,
        help="prefix: send each request where one cost of the prompt prefill still to do "
        "(from what each node's cache holds) and the node's load is least; p2c: least "
        "requests in flight of two random nodes (default LLMLB_ROUTING, config.json routing, "
        "else prefix)",
    )
    parser.add_argument(
        "--usage-retention-days",
        metavar="DAYS",
        help="days key usage is kept, 8 to 36500 (minute rows become hours after a week; "
        "default LLMLB_USAGE_RETENTION_DAYS, config.json usage_retention_days, else 90)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the database and admin key, then serve until SIGINT/SIGTERM."""
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    if args.max_inflight is not None and args.max_inflight < 1:
        raise SystemExit("--max-inflight must be >= 1")
    if args.stream_idle_timeout is not None and not args.stream_idle_timeout > 0:
        raise SystemExit("--stream-idle-timeout must be > 0")
    try:
        config.router_db(args.db)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # Set before anything imports prometheus_client, which picks its multi-process mode at
    # import time.
    metrics_dir = bus_dir = None
    if args.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="llmlb-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        # The workers' prefix indexes follow each other through sockets here (0700).
        from llmlb.router.proxy.index_bus import BUS_DIR_ENV

        bus_dir = tempfile.mkdtemp(prefix="llmlb-index-")
        os.environ[BUS_DIR_ENV] = bus_dir
    else:
        os.environ.pop("LLMLB_INDEX_BUS_DIR", None)  # one worker: no bus, whatever inherited

    from granian import Granian
    from granian.constants import Interfaces

    from llmlb.logs import configure_logging
    from llmlb.router.control.keys import bootstrap_admin_key
    from llmlb.router.control.nodes import mark_all_offline, reap
    from llmlb.router.control.settings import SETTINGS_ENV
    from llmlb.router.db import open_database

    configure_logging()
    log = logging.getLogger("llmlb.router")
    try:
        settings, proxy_settings = _settings(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    # The workers read these settings, and nothing else, from one JSON blob.
    os.environ[SETTINGS_ENV] = settings.to_json()
    try:
        conn = open_database(settings.database)
    except Exception as exc:  # noqa: BLE001 - no database, no router: say why in one line
        log.error("cannot open the database %s: %s", _shown(settings.database), exc)
        return 2
    try:
        bootstrap_admin_key(conn, settings.home, settings.admin_key)
        if settings.db_url:
            reap(conn, settings.offline_after_s)  # other routers' nodes are live
        else:
            mark_all_offline(conn)
    finally:
        conn.close()
    log.info(
        "router on http://%s:%d (db %s, %d worker(s), node approval %s, routing %s, "
        "usage kept %d days)",
        args.host,
        args.port,
        _shown(settings.database),
        args.workers,
        settings.node_approval,
        proxy_settings.routing,
        settings.usage_retention_days,
    )
    try:
        Granian(
            APP_FACTORY,
            address=args.host,
            port=args.port,
            interface=Interfaces.ASGI,
            workers=args.workers,
            factory=True,
            # The app sheds inference traffic above max_inflight (503 overloaded); Granian's
            # own cap (backlog / workers by default) must lie well above it.
            backlog=LISTEN_BACKLOG,
            backpressure=proxy_settings.max_inflight + CONTROL_BUDGET,
            log_access=False,
            # A worker signalled in the instant it starts may miss the signal; never hang on it.
            workers_kill_timeout=WORKERS_KILL_TIMEOUT_S,
        ).serve()
    finally:
        for directory in (metrics_dir, bus_dir):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
    return 0


def _settings(args: argparse.Namespace) -> tuple[RouterSettings, ProxySettings]:
    """The router's and its proxy's settings: the flags over the environment and
    ``config.json``; the proxy's ride in the router's (``RouterSettings.proxy``).

    Raises:
        ValueError: a setting in the environment or ``config.json`` is invalid.
    """
    from llmlb.router.control.settings import RouterSettings
    from llmlb.router.proxy.proxy import ProxySettings

    settings = replace(RouterSettings.from_env(args.db), workers=args.workers)
    if args.node_approval is not None:
        settings = replace(settings, node_approval=args.node_approval)
    if args.usage_retention_days is not None:
        retention = config.usage_retention_days(args.usage_retention_days)
        settings = replace(settings, usage_retention_days=retention)
    proxy = ProxySettings.from_config()
    flags = {
        "max_inflight": args.max_inflight,
        "stream_idle_timeout_s": args.stream_idle_timeout,
        "routing": args.routing,
    }
    proxy = replace(
        proxy,
        max_body_bytes=settings.max_body_bytes,  # the router's own limit, as in a worker
        **{name: value for name, value in flags.items() if value is not None},
    )
    return replace(settings, proxy=asdict(proxy)), proxy


def _shown(target: object) -> str:
    """The database for logs: a URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    text = str(target)
    parts = urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
