"""The fleet's peer view: the credential nodes serve each other's files with, who holds a
model ready at its manifest's revision, which nodes fetch it from the hub first (seeds),
and peers reported for serving bad bytes.

Only approved nodes are peers, and a pending node asking gets no peers (it holds no peer
token to fetch with). Reports are weighed (:func:`weigh_reports`): a node's report takes the
peer off that node's own list at once, and off every list when :data:`REPORT_QUORUM`
distinct approved nodes reported it, so no single credential evicts a node from the fleet.

A node asking for a manifest (``?node_id=``) gets ``peers``: online nodes that report the
model ``ready`` at the manifest's revision, least busy uploaders first, then the nodes that
report it ``downloading`` (they trade pieces while they download,
:mod:`llmlb.node.models.swarm`; each piece map names the revision, which the asking node
checks). A node that reports ``serves_peers: false`` (no upload budget) is never listed.
When there is none yet, the router lets only ``seeds`` nodes (``LLMLB_PEER_SEEDS``, default
1) start from the hub: the nodes that need the model are ranked by a hash of (model, node),
so every worker and every request agrees without any shared state, and the others get
``peer_wait_s``: they ask again until a peer is listed (the seed reports ``downloading``, at
once: a state change sends a heartbeat) or that time passed, then go to the hub. A seed that
fails or goes offline drops out of the ranking, and the next node takes its place.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter

from llmlb import config
from llmlb.files import atomic_write
from llmlb.protocol import PeerSource

logger = logging.getLogger("llmlb.router")

FLEET_KEY_FILE = "fleet.key"

PEER_REPORTS = Counter(
    "llmlb_router_peer_reports_total",
    "Peers reported for serving bad bytes (reports by approved nodes).",
    ["node"],
)

#: Distinct approved reporters that take a peer off every node's list for a model.
REPORT_QUORUM = 2


# -- the fleet credential ---------------------------------------------------------------------


@functools.cache
def fleet_token(home: Path, secret: str | None = None) -> str:
    """The bearer token registered nodes present to each other on ``/v0/peer/*``.

    Derived (HMAC-SHA256) from ``secret`` (``LLMLB_FLEET_SECRET``, as the router's settings
    read it at start; read now when not given), else from ``home/fleet.key`` (created once,
    mode 0600, by whichever worker gets there first), so every worker hands out the same
    token and none of the secret reaches a node. It is no router key: the router accepts it
    nowhere.
    """
    secret = secret or config.fleet_secret() or _file_secret(Path(home) / FLEET_KEY_FILE)
    return "fleet-" + hmac.new(secret.encode(), b"llmlb peer token v1", "sha256").hexdigest()


def _file_secret(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        if text := path.read_text().strip():
            return text
    # never replaces the file another worker made: every worker reads the first one
    atomic_write(path, secrets.token_urlsafe(32), private=True, replace=False)
    return path.read_text().strip()


# -- who can serve whom -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeModels:
    """A registered node and the model reports of its last heartbeat."""

    node_id: str
    url: str
    online: bool
    models: dict[str, dict] = field(default_factory=dict)
    approved: bool = True

    @property
    def uploads(self) -> int:
        """Peer transfers the node serves now, over all its models."""
        return sum(int(report.get("uploads") or 0) for report in self.models.values())


def _rank(model_id: str, node_id: str) -> bytes:
    return hashlib.sha256(f"{model_id}\0{node_id}".encode()).digest()


def peer_plan(
    model_id: str,
    revision: str | None,
    requester: str | None,
    nodes: Iterable[NodeModels],
    *,
    seeds: int,
    wait_s: float,
    bad: frozenset[str] = frozenset(),
) -> tuple[list[PeerSource], float | None]:
    """The ``peers`` and ``peer_wait_s`` of a manifest answer for the node ``requester``.

    Args:
        model_id: the model.
        revision: the manifest's pinned revision (a peer must hold exactly this one).
        requester: the asking node's id (``None``: not a node, e.g. ``llmlb pull``); a
            pending node gets no peers and no wait.
        nodes: every registered node (pending ones are never listed).
        seeds: nodes that may fetch from the hub while no peer is ready.
        wait_s: how long the others wait for a peer.
        bad: nodes reported for serving bad bytes of this model (never listed).

    Returns:
        Peers (least busy first) and ``None``, or no peers and the wait (``None``: fetch
        from the hub now).
    """
    nodes = list(nodes)
    if requester is not None and any(n.node_id == requester and not n.approved for n in nodes):
        return [], None  # no peer token to fetch with: the hub
    nodes = [node for node in nodes if node.online and node.approved]
    peers = [
        node
        for node in nodes
        if node.node_id != requester
        and node.node_id not in bad
        and revision is not None
        and (report := node.models.get(model_id)) is not None
        and report.get("serves_peers") is not False
        and (
            (report.get("state") == "ready" and report.get("revision") == revision)
            or report.get("state") == "downloading"
        )
    ]
    if peers:
        peers.sort(
            key=lambda node: (
                (node.models.get(model_id) or {}).get("state") != "ready",
                node.uploads,
                _rank(model_id, node.node_id),
            )
        )
        return [PeerSource(node.node_id, node.url, node.uploads) for node in peers], None
    if requester is None or wait_s <= 0 or not any(n.node_id == requester for n in nodes):
        return [], None
    needing = [
        node.node_id
        for node in nodes
        if node.node_id == requester
        or (node.models.get(model_id) or {}).get("state") not in ("ready", "failed")
    ]
    needing.sort(key=lambda node_id: _rank(model_id, node_id))
    if requester in needing[: max(1, seeds)]:
        return [], None
    return [], wait_s


def weigh_reports(
    reports: Iterable[tuple[str, str]], requester: str | None, quorum: int = REPORT_QUORUM
) -> frozenset[str]:
    """The peers not to list for ``requester``, from a model's reports.

    Args:
        reports: ``(peer, reporter)`` pairs, reporters approved nodes only.
        requester: the asking node (``None``: not a node).
        quorum: distinct reporters that take a peer off every list.

    Returns:
        Peers that ``requester`` reported itself, and peers ``quorum`` nodes reported.
    """
    reporters: dict[str, set[str]] = {}
    for peer, reporter in reports:
        reporters.setdefault(peer, set()).add(reporter)
    return frozenset(
        peer for peer, who in reporters.items() if len(who) >= quorum or requester in who
    )


def log_report(
    model_id: str, node_id: str, reason: str, reporter: str | None, counted: bool
) -> None:
    """Log a report, and count it when it weighs (``counted``: an approved reporter's)."""
    if counted:
        PEER_REPORTS.labels(node=node_id).inc()
        logger.warning(
            "node %s served bad bytes of %s (reported by %s): %s",
            node_id,
            model_id,
            reporter,
            reason,
        )
    else:
        logger.warning(
            "node %s served bad bytes of %s, says %s, which is no approved node (not "
            "counted): %s",
            node_id,
            model_id,
            reporter or "a report naming no reporter",
            reason,
        )
