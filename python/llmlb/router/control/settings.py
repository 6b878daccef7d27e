"""Router settings: one immutable object built from ``llmlb.config`` at start.

``llmlb router`` builds it once (its flags over the environment and ``config.json``) and hands
it to its Granian workers as one JSON blob in the environment (``LLMLB_ROUTER_SETTINGS``,
:meth:`RouterSettings.to_json`), as ``llmlb node`` does; a worker reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from llmlb import config

SETTINGS_ENV = "LLMLB_ROUTER_SETTINGS"


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """Everything the router app (and the inference proxy it hosts) is configured with.

    Attributes:
        home: ``$LLMLB_HOME``; the generated admin key lives here.
        db_path: the SQLite file (``lb.db``), used when ``db_url`` is not set.
        db_url: a ``postgresql://`` URL: the database several routers share.
        max_body_bytes: requests with a larger body get 413.
        heartbeat_interval_s: heartbeat period asked of nodes.
        missed_heartbeats: a node silent for this many periods is offline.
        sync_backoff_base_s: first retry delay of a failed sync notification.
        sync_backoff_max_s: cap of that delay.
        sync_timeout_s: timeout of one sync notification request.
        change_poll_interval_s: how often a worker checks SQLite for changes made by
            other workers (keys, nodes, models); PostgreSQL pushes them (``LISTEN``).
        full_refresh_s: every this often a worker reloads all its caches anyway (and the
            active-request counts nodes report).
        hf_endpoint: hub base URL for registrations.
        hf_token: hub token; used for hub calls only, never stored or sent to nodes.
        admin_key: the fixed admin key (``LLMLB_ADMIN_KEY``), if any.
        node_approval: ``manual`` (a node id never approved joins ``pending``: no client
            traffic, no peer token, in no peer list, until an admin approves it) or ``auto``
            (every node is approved when it registers).
        usage_retention_days: days key usage is kept (``--usage-retention-days``,
            ``LLMLB_USAGE_RETENTION_DAYS``; 8 to 36500, default 90; hourly roll-ups after a
            week).
        workers: the router's worker processes (``--workers``); with more than one, each
            takes leases of a limited key's rpm/tpm from the database, as routers do.
        peer_seeds: nodes that fetch a model from the hub at once (``LLMLB_PEER_SEEDS``).
        peer_wait_s: how long the other nodes wait for a seed's copy (``LLMLB_PEER_WAIT_S``).
        fleet_secret: what the nodes' peer token derives from (``LLMLB_FLEET_SECRET``;
            ``None``: a ``fleet.key`` file in ``home``).
        proxy: the inference proxy's settings (``ProxySettings`` fields, the CLI's flags
            applied); empty: the proxy reads its own (``ProxySettings.from_config``).
    """

    home: Path
    db_path: Path
    db_url: str | None = None
    max_body_bytes: int = config.DEFAULT_MAX_BODY_BYTES
    heartbeat_interval_s: float = config.DEFAULT_HEARTBEAT_INTERVAL_S
    missed_heartbeats: int = 3
    sync_backoff_base_s: float = config.DEFAULT_SYNC_BACKOFF_BASE_S
    sync_backoff_max_s: float = config.DEFAULT_SYNC_BACKOFF_MAX_S
    sync_timeout_s: float = 10.0
    change_poll_interval_s: float = 0.25
    full_refresh_s: float = 5.0
    hf_endpoint: str = config.DEFAULT_HF_ENDPOINT
    hf_token: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    node_approval: str = config.DEFAULT_NODE_APPROVAL
    usage_retention_days: int = config.DEFAULT_USAGE_RETENTION_DAYS
    workers: int = 1
    peer_seeds: int = config.DEFAULT_PEER_SEEDS
    peer_wait_s: float = config.DEFAULT_PEER_WAIT_S
    fleet_secret: str | None = field(default=None, repr=False)
    proxy: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, db: str | Path | None = None) -> RouterSettings:
        """Build settings from the environment (through ``llmlb.config``).

        Args:
            db: the ``--db`` flag, when given (a SQLite file or a ``postgresql://`` URL).
        """
        home = config.llmlb_home().absolute()
        target = config.router_db(db)
        return cls(
            home=home,
            db_path=target if isinstance(target, Path) else home / "lb.db",
            db_url=target if isinstance(target, str) else None,
            max_body_bytes=config.router_max_body_bytes(),
            heartbeat_interval_s=config.heartbeat_interval_s(),
            sync_backoff_base_s=config.sync_backoff_base_s(),
            sync_backoff_max_s=config.sync_backoff_max_s(),
            hf_endpoint=config.hf_endpoint(),
            hf_token=config.hf_token(),
            admin_key=config.admin_key(),
            node_approval=config.node_approval(),
            usage_retention_days=config.usage_retention_days(),
            peer_seeds=config.peer_seeds(),
            peer_wait_s=config.peer_wait_s(),
            fleet_secret=config.fleet_secret(),
        )

    @classmethod
    def for_worker(cls) -> RouterSettings:
        """The settings ``llmlb router`` handed to this worker, else (a worker started some
        other way) :meth:`from_env`.

        Raises:
            ValueError: a setting in the environment is invalid.
        """
        text = config.router_settings_json()
        return cls.from_json(text) if text else cls.from_env()

    def to_json(self) -> str:
        """Serialise for the hand-off to the worker processes."""
        return config.settings_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> RouterSettings:
        """Inverse of :meth:`to_json` (unknown keys are ignored)."""
        return config.settings_from_dict(cls, orjson.loads(text), home=Path, db_path=Path)

    @property
    def database(self) -> str | Path:
        """What the router stores its state in: ``db_url``, else ``db_path``."""
        return self.db_url or self.db_path

    @property
    def auto_approve(self) -> bool:
        """Whether nodes are approved as they register (``node_approval`` ``auto``)."""
        return self.node_approval == "auto"

    @property
    def offline_after_s(self) -> float:
        """Silence after which a node counts as offline."""
        return self.heartbeat_interval_s * self.missed_heartbeats
