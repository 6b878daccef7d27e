"""Every environment variable and config-file setting llmlb reads, in one place.

Precedence for the node's model store:
``--models-dir`` > ``XLLM_MODELS_DIR`` > ``LLM_MODELS_DIR`` (deprecated) >
``models_dir`` in ``$LLMLB_HOME/config.json`` > ``$LLMLB_HOME/models``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import orjson

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_ROUTER_PORT = 8080
DEFAULT_NODE_PORT = 32769
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_ROUTER_URL = f"http://127.0.0.1:{DEFAULT_ROUTER_PORT}"
# Hosts a node may download from (and send HF_TOKEN to) besides HF_ENDPOINT's own host.
DEFAULT_ALLOWED_HOSTS = ("huggingface.co", "*.huggingface.co", "*.hf.co")


def llmlb_home() -> Path:
    """Return ``$LLMLB_HOME`` (default ``~/.llmlb``), without creating it."""
    return Path(os.environ.get("LLMLB_HOME") or Path.home() / ".llmlb").expanduser()


def load_config_file(home: Path | None = None) -> dict:
    """Return ``$LLMLB_HOME/config.json`` as a dict; ``{}`` when absent.

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    path = (home or llmlb_home()) / "config.json"
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def models_dir(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the node's model store root by the documented precedence.

    Args:
        cli_value: the ``--models-dir`` flag, when given.

    Returns:
        An absolute path (not created).
    """
    if cli_value:
        return Path(cli_value).expanduser().absolute()
    if value := os.environ.get("XLLM_MODELS_DIR"):
        return Path(value).expanduser().absolute()
    if value := os.environ.get("LLM_MODELS_DIR"):
        logger.warning("LLM_MODELS_DIR is deprecated; set XLLM_MODELS_DIR instead")
        return Path(value).expanduser().absolute()
    home = llmlb_home()
    if value := load_config_file(home).get("models_dir"):
        return Path(value).expanduser().absolute()
    return (home / "models").absolute()


def hf_endpoint() -> str:
    """Hub base URL (``HF_ENDPOINT``), without a trailing slash."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_token() -> str | None:
    """Hub token (``HF_TOKEN``); only ever sent to allowlisted hub hosts."""
    return os.environ.get("HF_TOKEN") or None


def default_allowed_hosts() -> list[str]:
    """Download allowlist: the host of ``HF_ENDPOINT`` plus the public hub's hosts."""
    hosts = [urlparse(hf_endpoint()).hostname or ""]
    hosts.extend(DEFAULT_ALLOWED_HOSTS)
    return [h for h in dict.fromkeys(hosts) if h]


def admin_key() -> str | None:
    """``LLMLB_ADMIN_KEY``: fixes the router's admin key, and is the CLI's default key."""
    return os.environ.get("LLMLB_ADMIN_KEY") or None


def router_url() -> str:
    """The first router of ``LLMLB_ROUTER_URL`` (the one CLI tools talk to), or the local
    default."""
    urls = router_urls()
    return urls[0] if urls else DEFAULT_ROUTER_URL


def router_urls(value: str | None = None) -> list[str]:
    """Every router of a fleet, in order, from ``URL1,URL2`` (default: ``LLMLB_ROUTER_URL``,
    else the local default), each without a trailing slash; ``[]`` for an empty ``value``."""
    raw = (os.environ.get("LLMLB_ROUTER_URL") or DEFAULT_ROUTER_URL) if value is None else value
    urls = [part.strip().rstrip("/") for part in raw.split(",")]
    return list(dict.fromkeys(url for url in urls if url))


def node_key() -> str | None:
    """``LLMLB_NODE_KEY``: the node-scope key a node presents to the router."""
    return os.environ.get("LLMLB_NODE_KEY") or None


# --- router ---------------------------------------------------------------------------------

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_SYNC_BACKOFF_BASE_S = 1.0
DEFAULT_SYNC_BACKOFF_MAX_S = 60.0


def _env_number(name: str, default: float, minimum: float) -> float:
    """A positive number from the environment variable ``name``.

    Raises:
        ValueError: the variable is set but is not a number ``>= minimum``.
    """
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


POSTGRES_URL_PREFIXES = ("postgresql://", "postgres://")


def router_db(cli_value: str | os.PathLike[str] | None = None) -> str | Path:
    """The router's database: ``--db`` > ``LLMLB_ROUTER_DB`` > ``config.json`` ``db`` >
    ``$LLMLB_HOME/lb.db``.

    Returns:
        A ``postgresql://`` URL (``str``, several routers may share it), or the absolute
        path of the SQLite file.

    Raises:
        ValueError: ``config.json`` is invalid, or its ``db`` is not a string.
    """
    value = cli_value or os.environ.get("LLMLB_ROUTER_DB")
    if not value:
        value = load_config_file().get("db")
        if value is not None and not isinstance(value, str):
            raise ValueError("config.json: 'db' must be a string (a file or postgresql:// URL)")
    if isinstance(value, str) and value.startswith(POSTGRES_URL_PREFIXES):
        return value
    if value:
        return Path(value).expanduser().absolute()
    return (llmlb_home() / "lb.db").absolute()


def router_db_path(cli_value: str | os.PathLike[str] | None = None) -> Path:
    """The router's SQLite file (see :func:`router_db`; ``$LLMLB_HOME/lb.db`` when the
    database is PostgreSQL)."""
    target = router_db(cli_value)
    return target if isinstance(target, Path) else (llmlb_home() / "lb.db").absolute()


def router_max_body_bytes() -> int:
    """``LLMLB_MAX_BODY_BYTES``: largest request body the router accepts (default 1 MiB)."""
    return int(_env_number("LLMLB_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, 1))


def heartbeat_interval_s() -> float:
    """``LLMLB_HEARTBEAT_INTERVAL_S``: heartbeat period the router asks of nodes (default 5)."""
    return _env_number("LLMLB_HEARTBEAT_INTERVAL_S", DEFAULT_HEARTBEAT_INTERVAL_S, 0.1)


def sync_backoff_base_s() -> float:
    """``LLMLB_SYNC_BACKOFF_BASE_S``: first retry delay of a failed sync notification (1 s)."""
    return _env_number("LLMLB_SYNC_BACKOFF_BASE_S", DEFAULT_SYNC_BACKOFF_BASE_S, 0.001)


def sync_backoff_max_s() -> float:
    """``LLMLB_SYNC_BACKOFF_MAX_S``: cap of the sync notification retry delay (60 s)."""
    return _env_number("LLMLB_SYNC_BACKOFF_MAX_S", DEFAULT_SYNC_BACKOFF_MAX_S, 0.001)


def _choice(env: str, key: str, choices: tuple[str, ...], default: str, what: str) -> str:
    """The environment variable ``env`` > ``config.json``'s ``key`` > ``default``, one of
    ``choices``.

    Raises:
        ValueError: the value is not one of ``choices``, or ``config.json`` is invalid.
    """
    value = os.environ.get(env) or load_config_file().get(key)
    if value is None or value == "":
        return default
    if value not in choices:
        raise ValueError(f"{what} must be {' or '.join(choices)}, not {value!r}")
    return value


NODE_APPROVAL_MODES = ("auto", "manual")
DEFAULT_NODE_APPROVAL = "manual"


def node_approval() -> str:
    """``LLMLB_NODE_APPROVAL`` > ``config.json`` ``node_approval`` > ``manual``: whether a node
    id the router has never approved serves clients at once (``auto``) or waits ``pending``
    until an admin approves it (``manual``; ``llmlb up`` starts its router with ``auto``).

    Raises:
        ValueError: the value is neither ``auto`` nor ``manual``, or ``config.json`` is invalid.
    """
    return _choice(
        "LLMLB_NODE_APPROVAL",
        "node_approval",
        NODE_APPROVAL_MODES,
        DEFAULT_NODE_APPROVAL,
        "node approval",
    )


DEFAULT_USAGE_RETENTION_DAYS = 90
# Minute rows are rolled up into hours after a week: a shorter retention would delete them first.
MIN_USAGE_RETENTION_DAYS = 8
MAX_USAGE_RETENTION_DAYS = 36_500


def usage_retention_days(cli_value: int | str | None = None) -> int:
    """Days the router keeps key usage: ``--usage-retention-days`` >
    ``LLMLB_USAGE_RETENTION_DAYS`` > ``config.json`` ``usage_retention_days`` > 90.

    Raises:
        ValueError: the value (named with its source) is not a whole number of days from
            :data:`MIN_USAGE_RETENTION_DAYS` to :data:`MAX_USAGE_RETENTION_DAYS`, or
            ``config.json`` is invalid.
    """
    source, value = "--usage-retention-days", cli_value
    if value is None:
        source, value = "LLMLB_USAGE_RETENTION_DAYS", os.environ.get("LLMLB_USAGE_RETENTION_DAYS")
        if not value:  # unset or empty
            source = "config.json usage_retention_days"
            value = load_config_file().get("usage_retention_days")
    if value is None:
        return DEFAULT_USAGE_RETENTION_DAYS
    days = None
    if isinstance(value, int) and not isinstance(value, bool):
        days = value
    elif isinstance(value, str) and value.strip().isdigit():
        days = int(value.strip())
    if days is None or not MIN_USAGE_RETENTION_DAYS <= days <= MAX_USAGE_RETENTION_DAYS:
        raise ValueError(
            f"{source}={value!r}: usage retention is a whole number of days from "
            f"{MIN_USAGE_RETENTION_DAYS} (hourly roll-ups begin after a week) to "
            f"{MAX_USAGE_RETENTION_DAYS}"
        )
    return days


ROUTING_POLICIES = ("prefix", "p2c")
DEFAULT_ROUTING = "prefix"


def routing() -> str:
    """``LLMLB_ROUTING`` > ``config.json`` ``routing`` > ``prefix``: how the router picks a
    node: ``prefix`` (one cost for the prompt prefill still to do on a node, from what its
    cache holds, and its load) or ``p2c`` (least requests in flight of two random nodes).

    Raises:
        ValueError: the value is neither ``prefix`` nor ``p2c``, or ``config.json`` is invalid.
    """
    return _choice("LLMLB_ROUTING", "routing", ROUTING_POLICIES, DEFAULT_ROUTING, "routing")


def settings_from_dict(
    kind: type[_T], data: dict[str, Any], **convert: Callable[[Any], Any]
) -> _T:
    """A settings dataclass from its JSON hand-off form (``dataclasses.asdict``, then JSON).

    Args:
        kind: the dataclass.
        data: its fields; keys it does not know (from a newer or older version) are dropped.
        convert: per field, what turns the JSON value back into the field's type (``Path``,
            ``tuple``, a nested settings class's reader).
    """
    names = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    return kind(
        **{k: convert[k](v) if k in convert else v for k, v in data.items() if k in names}
    )


def settings_to_json(settings: object) -> str:
    """The JSON hand-off form of a settings dataclass (paths as strings)."""
    return orjson.dumps(asdict(settings), default=str).decode()  # type: ignore[call-overload]


def router_settings_json() -> str | None:
    """``LLMLB_ROUTER_SETTINGS``: the settings ``llmlb router`` hands to its workers."""
    return os.environ.get("LLMLB_ROUTER_SETTINGS") or None


def prometheus_multiproc_dir() -> Path | None:
    """``PROMETHEUS_MULTIPROC_DIR``: set when several router workers share their metrics."""
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


def proxy_overrides(names: list[str] | tuple[str, ...]) -> dict[str, object]:
    """Inference-proxy tuning: ``LLMLB_PROXY_<NAME>`` env vars over ``config.json``'s ``proxy``.

    Args:
        names: the setting names (e.g. ``cooldown_s``) the caller understands.

    Returns:
        ``{name: raw value}`` for each name set somewhere (env values are strings).

    Raises:
        ValueError: ``config.json`` is invalid, or its ``proxy`` entry is not an object.
    """
    section = load_config_file().get("proxy") or {}
    if not isinstance(section, dict):
        raise ValueError("config.json: 'proxy' must be an object")
    found: dict[str, object] = {}
    for name in names:
        env = os.environ.get(f"LLMLB_PROXY_{name.upper()}")
        if env:
            found[name] = env
        elif name in section:
            found[name] = section[name]
    return found


# --- node -----------------------------------------------------------------------------------


def node_require_key() -> str | None:
    """``LLMLB_NODE_REQUIRE_KEY``: when set, a node's ``/v1/*`` routes require this key."""
    return os.environ.get("LLMLB_NODE_REQUIRE_KEY") or None


def node_settings_json() -> str | None:
    """``LLMLB_NODE_SETTINGS``: the settings ``llmlb node`` hands to its server process."""
    return os.environ.get("LLMLB_NODE_SETTINGS") or None


# --- peers (fleet scale-out) ------------------------------------------------------------

DEFAULT_PEER_SEEDS = 1
DEFAULT_PEER_WAIT_S = 300.0


def fleet_secret() -> str | None:
    """``LLMLB_FLEET_SECRET``: the secret the fleet credential (nodes' peer token) derives
    from; set it alike on routers that share one database from several hosts (default: a
    ``fleet.key`` file the router creates in ``$LLMLB_HOME``)."""
    return os.environ.get("LLMLB_FLEET_SECRET") or None


def peer_seeds() -> int:
    """``LLMLB_PEER_SEEDS``: nodes that fetch a model from the hub at once (default 1)."""
    return int(_env_number("LLMLB_PEER_SEEDS", DEFAULT_PEER_SEEDS, 1))


def peer_wait_s() -> float:
    """``LLMLB_PEER_WAIT_S``: how long the other nodes wait for a seed's copy (default 300)."""
    return _env_number("LLMLB_PEER_WAIT_S", DEFAULT_PEER_WAIT_S, 0)
