"""FleetView: one worker's in-memory picture of nodes and models, read by the proxy.

Nothing here touches the database. The app reloads the view (``load``) whenever the
``fleet`` state version moves; lookups on the hot path are single dict reads. Nodes still
pending approval are left out when the view is loaded, so the proxy never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmlb.protocol import PENDING_STATES, ModelState


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the balancer needs of a node.

    ``token`` is the node's sync token: the proxy presents it to the node as its bearer
    credential, so a node can refuse inference from anyone but its router. ``active`` is
    the node's own count of requests in progress at its last heartbeat (from every router
    of the fleet), as of the last cache reload.
    """

    node_id: str
    url: str
    slots: int
    token: str | None = field(default=None, repr=False)
    active: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ModelReport:
    """What the fleet keeps of one model a node reports (:class:`llmlb.protocol.ModelReport`)."""

    state: str
    format: str | None = None
    size_bytes: int | None = None
    servable: bool = True  # one of the node's runtimes can serve it (older nodes: assumed)

    @property
    def usable(self) -> bool:
        """Ready and servable: the node can answer requests for the model."""
        return self.state == ModelState.READY and self.servable


@dataclass(slots=True)
class NodeState:
    """A registered node as the cache holds it (``approved``: an admin approved it, or the
    router approves every node; a pending node is never loaded into the view;
    ``credential``: the digest its id is bound to, see
    :class:`llmlb.router.control.nodes.Credential`)."""

    view: NodeView
    online: bool
    models: dict[str, ModelReport] = field(default_factory=dict)
    runtimes: tuple[str, ...] = ()
    approved: bool = True
    credential: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """A model registered with the router (metadata only)."""

    id: str
    repo: str
    format: str
    size_bytes: int
    created: int


class FleetView:
    """Nodes and models of the fleet, held in memory by each worker process.

    Args:
        on_offline: called with a node id after :meth:`mark_node_offline`, so the app can
            persist it in the background.
    """

    def __init__(self, on_offline: Callable[[str], None] | None = None) -> None:
        self._on_offline = on_offline
        self._gone: list[Callable[[str], None]] = []
        self._nodes: dict[str, NodeState] = {}
        self._members: dict[str, tuple[str | None, bool]] = {}
        self._models: dict[str, RegisteredModel] = {}
        self._ready: dict[str, list[NodeView]] = {}
        self._pending: set[str] = set()
        self._unservable: dict[str, set[str]] = {}
        self._changed = asyncio.Event()

    # -- hot path ---------------------------------------------------------------------

    def ready_nodes(self, model_id: str) -> list[NodeView]:
        """Online nodes reporting ``model_id`` ready (treat the list as read-only)."""
        nodes = self._ready.get(model_id)
        return nodes if nodes is not None else []

    def model_status(self, model_id: str) -> str:
        """``ready``, ``pending`` (some online node downloading/loading it), ``unservable``
        (online nodes hold it but none of their runtimes can serve it), ``registered``, or
        ``unknown``."""
        if model_id in self._ready:
            return "ready"
        if model_id in self._pending:
            return "pending"
        if model_id in self._unservable:
            return "unservable"
        if model_id in self._models:
            return "registered"
        return "unknown"

    def incapable(self, model_id: str) -> tuple[str | None, list[str]]:
        """The model's format and the runtimes of the online nodes that hold it but cannot
        serve it (for the ``no_capable_node`` answer)."""
        model = self._models.get(model_id)
        fmt = model.format if model is not None else None
        if fmt is None:
            for node in self._nodes.values():
                report = node.models.get(model_id)
                if report is not None and report.format:
                    fmt = report.format
                    break
        return fmt, sorted(self._unservable.get(model_id, ()))

    def node_online(self, node_id: str) -> bool:
        """Whether ``node_id`` is registered and online."""
        node = self._nodes.get(node_id)
        return node is not None and node.online

    async def wait_for_change(self, timeout: float) -> None:
        """Return when node or model state changes, or after ``timeout`` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def mark_node_offline(self, node_id: str) -> None:
        """Take a node out of rotation now (the proxy found it dead); persisted in background."""
        node = self._nodes.get(node_id)
        if node is None or not node.online:
            return
        node.online = False
        self._reindex()
        self._left(node_id)
        if self._on_offline is not None:
            self._on_offline(node_id)

    def on_gone(self, callback: Callable[[str], None]) -> None:
        """Call ``callback`` with the id of each node that leaves the view or goes offline,
        or registers again (a new sync token: most likely a restarted node)."""
        self._gone.append(callback)

    def member(self, node_id: str) -> tuple[str | None, bool] | None:
        """``(credential digest, approved)`` of a registered node, pending ones included;
        ``None`` when this view does not know the id."""
        return self._members.get(node_id)

    def _left(self, node_id: str) -> None:
        for callback in self._gone:
            callback(node_id)

    # -- maintenance ----------------------------------------------------------------------

    def load(self, nodes: Iterable[NodeState], models: Iterable[RegisteredModel]) -> None:
        """Replace the whole picture (after a change in the database); pending nodes are
        left out."""
        nodes = list(nodes)
        old = self._nodes
        self._members = {node.view.node_id: (node.credential, node.approved) for node in nodes}
        self._nodes = {node.view.node_id: node for node in nodes if node.approved}
        self._models = {model.id: model for model in models}
        self._reindex()
        if self._gone:
            for node_id, before in old.items():
                after = self._nodes.get(node_id)
                if (
                    after is None
                    or (before.online and not after.online)
                    or after.view.token != before.view.token
                    or after.view.url != before.view.url
                ):
                    self._left(node_id)

    def _reindex(self) -> None:
        ready: dict[str, list[NodeView]] = {}
        pending: set[str] = set()
        unservable: dict[str, set[str]] = {}
        for node in self._nodes.values():
            if not node.online:
                continue
            for model_id, report in node.models.items():
                if report.usable:
                    ready.setdefault(model_id, []).append(node.view)
                elif not report.servable:
                    unservable.setdefault(model_id, set()).update(node.runtimes)
                elif report.state in PENDING_STATES:
                    pending.add(model_id)
        self._ready = ready
        self._pending = pending
        self._unservable = unservable
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def has_node(self, node_id: str) -> bool:
        """Whether ``node_id`` is registered (online or not)."""
        return node_id in self._nodes

    def online_nodes(self) -> list[NodeView]:
        """Every online node."""
        return [node.view for node in self._nodes.values() if node.online]

    def node_counts(self) -> dict[str, int]:
        """``{"online": n, "offline": m}``."""
        online = sum(1 for node in self._nodes.values() if node.online)
        return {"online": online, "offline": len(self._nodes) - online}

    def registered(self, model_id: str) -> RegisteredModel | None:
        """A registered model, or ``None``."""
        return self._models.get(model_id)

    def model_entries(self) -> list[dict]:
        """``GET /v1/models`` data: registered models plus those online nodes hold on disk."""
        entries: dict[str, dict] = {}
        for model in self._models.values():
            entries[model.id] = {
                "id": model.id,
                "object": "model",
                "created": model.created,
                "owned_by": "llmlb",
                "ready": False,
                "nodes_ready": 0,
                "format": model.format,
                "size_bytes": model.size_bytes,
                "repo": model.repo,
            }
        for node in self._nodes.values():
            if not node.online:
                continue
            for model_id, report in node.models.items():
                if report.state == ModelState.FAILED and model_id not in entries:
                    continue
                entry = entries.get(model_id)
                if entry is None:
                    entry = entries[model_id] = {
                        "id": model_id,
                        "object": "model",
                        "created": 0,
                        "owned_by": "llmlb",
                        "ready": False,
                        "nodes_ready": 0,
                        "format": report.format,
                        "size_bytes": report.size_bytes,
                        "repo": None,
                    }
                if report.usable:
                    entry["ready"] = True
                    entry["nodes_ready"] += 1
                    entry["format"] = entry["format"] or report.format
                    if entry["size_bytes"] is None:
                        entry["size_bytes"] = report.size_bytes
        return sorted(entries.values(), key=lambda entry: entry["id"])

    def model_entry(self, model_id: str) -> dict | None:
        """One ``GET /v1/models/{id}`` entry, or ``None``."""
        for entry in self.model_entries():
            if entry["id"] == model_id:
                return entry
        return None
