"""Node settings: one immutable object, built by ``llmlb node`` and handed to the app.

The engine's and the downloader's tuning are their own option objects
(:class:`~llmlb.node.inference.engine.EngineOptions`,
:class:`~llmlb.node.models.download.options.DownloadOptions`), nested here as they are, so
each option is written once: the CLI fills them, the service hands them on.

Granian imports the ASGI app in its worker process, so the CLI passes the settings to it as
JSON in the environment (``llmlb.config.node_settings_json``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from llmlb import config
from llmlb.node.models.download.options import DownloadOptions

if TYPE_CHECKING:
    from llmlb.node.inference.engine import EngineOptions

SETTINGS_ENV = "LLMLB_NODE_SETTINGS"

# Upload budget for peers, megabits/s: a fast LAN's share, well below loopback speeds.
DEFAULT_PEER_UPLOAD_MBPS = 2000.0


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Everything a node is configured with.

    Attributes:
        router_url: router base URL, or ``""`` to serve local models only.
        api_key: node-scope key presented to the router.
        host, port: where the node listens.
        advertise_url: URL the router uses to reach the node (default from host/port).
        models_dir: the model store root.
        allowed_hosts: download allowlist.
        hf_token: hub token, sent only to allowlisted hosts.
        engine: the engine's options (models resident, slots per model, advertised to the
            router as ``slots``, queueing, context, threads, prompt-cache RAM …).
        download: the downloader's options (range connections per file …).
        max_body_bytes: largest request body (413 beyond): the router's limit
            (``LLMLB_MAX_BODY_BYTES``), so whatever the router forwards fits.
        heartbeat_interval_s: used until the router tells its own.
        reconcile_interval_s: how often the node re-reads the router's whole registry (to
            catch sync notifications it missed).
        require_key: when set, ``/v1/*`` accepts ``Authorization: Bearer <require_key>``.
        require_router_token: ``/v1/*`` accepts the router's token for this node (the
            ``sync_token`` it got at registration, which the router's proxy presents).
            With either credential required, a request carrying neither gets 401.
        store_all: also download models none of the node's runtimes serves (a node that
            holds models for others); they are stored, reported ``servable: false``, never
            served.
        peer_upload_mbps: upload budget for serving model files to other nodes of the
            fleet, in megabits/s (0: serve none).
        peer_fetch: download from the peers the router lists (else from the hub only).
    """

    router_url: str
    api_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = config.DEFAULT_NODE_PORT
    advertise_url: str = ""
    models_dir: Path = Path(".")
    allowed_hosts: tuple[str, ...] = ()
    hf_token: str | None = field(default=None, repr=False)
    engine: EngineOptions = field(default_factory=lambda: _engine_options_type()())
    download: DownloadOptions = field(default_factory=DownloadOptions)
    max_body_bytes: int = config.DEFAULT_MAX_BODY_BYTES
    heartbeat_interval_s: float = 5.0
    reconcile_interval_s: float = 60.0
    require_key: str | None = field(default=None, repr=False)
    require_router_token: bool = False
    store_all: bool = False
    peer_upload_mbps: float = DEFAULT_PEER_UPLOAD_MBPS
    peer_fetch: bool = True

    @property
    def url(self) -> str:
        """The URL registered with the router."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def to_json(self) -> str:
        """Serialise for the hand-off to the server process."""
        return config.settings_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> NodeSettings:
        """Inverse of :meth:`to_json`."""
        engine = _engine_options_type()
        return config.settings_from_dict(
            cls,
            orjson.loads(text),
            models_dir=Path,
            allowed_hosts=lambda hosts: tuple(hosts or ()),
            engine=lambda data: _options(engine, data),
            download=lambda data: _options(DownloadOptions, data),
        )

    @classmethod
    def from_env(cls) -> NodeSettings:
        """The settings the CLI left in the environment.

        Raises:
            RuntimeError: the app was started without ``llmlb node``.
        """
        text = config.node_settings_json()
        if not text:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the node with `llmlb node`")
        return cls.from_json(text)


def _engine_options_type() -> type[EngineOptions]:
    """:class:`EngineOptions`, imported when first needed: the engine's module is heavy, and
    every ``llmlb`` command imports this one."""
    from llmlb.node.inference.engine import EngineOptions

    return EngineOptions


_T = TypeVar("_T")


def _options(kind: type[_T], data: dict[str, Any]) -> _T:
    """``kind`` (an options dataclass whose fields all have defaults) from its ``asdict``
    form: unknown keys dropped, nested option objects and tuples rebuilt."""
    defaults = kind()
    convert: dict[str, Callable[[Any], Any]] = {}
    for option in fields(kind):  # type: ignore[arg-type]
        default = getattr(defaults, option.name)
        if is_dataclass(default):
            convert[option.name] = functools.partial(_options, type(default))
        elif isinstance(default, tuple):
            convert[option.name] = tuple
    return config.settings_from_dict(kind, data, **convert)
