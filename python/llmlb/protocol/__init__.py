"""The node–router protocol: model states, manifests, model reports, registration and
heartbeat bodies and the router's answers to them, and the sync notification, written once
for the router, the node, the CLI and the OpenAPI document.

Conventions: ``parse`` validates a body that came over the wire from the other side and
raises :class:`~llmlb.errors.ApiError` 400 naming the bad field (the router's answer);
``from_dict`` reads a body from a trusted peer (the router's manifest, read by a node);
``to_dict`` gives the JSON-ready wire form. Each type's ``SCHEMA`` is its JSON Schema in the
router's OpenAPI document (:mod:`llmlb.router.api.openapi`).

One module per shape: :mod:`.fields` (bounds, model states, validators, schema pieces),
:mod:`.manifests`, :mod:`.reports`, :mod:`.registration`, :mod:`.sync`; every public name is
re-exported here, so ``from llmlb.protocol import X`` is the way to import them.

Model reports, the ``models`` of registrations and heartbeats, travel and are stored as plain
dicts in their wire form: a node builds them with :meth:`ModelReport.to_dict`, the router
checks them with :func:`parse_model_reports` straight into that form (one pass per model per
heartbeat, no object in between).
"""

from __future__ import annotations

from typing import Any

from llmlb.protocol.fields import (
    MAX_BYTES,
    MAX_COUNT,
    MODEL_STATES,
    PENDING_STATES,
    ModelState,
    validate_node_id,
    validate_node_secret,
    validate_url,
)
from llmlb.protocol.manifests import (
    APPROVAL_FIELD,
    PEER_TOKEN_FIELD,
    Approval,
    Manifest,
    ManifestFile,
    PeerReport,
    PeerSource,
)
from llmlb.protocol.registration import Heartbeat, HeartbeatAnswer, Registration, RegistrationAnswer
from llmlb.protocol.reports import PEER_COUNTERS, ModelReport, parse_model_reports, transfer_totals
from llmlb.protocol.sync import SyncAction, SyncNotice

__all__ = [
    "APPROVAL_FIELD",
    "Approval",
    "Heartbeat",
    "HeartbeatAnswer",
    "MAX_BYTES",
    "MAX_COUNT",
    "MODEL_STATES",
    "Manifest",
    "ManifestFile",
    "ModelReport",
    "ModelState",
    "PEER_COUNTERS",
    "PEER_TOKEN_FIELD",
    "PENDING_STATES",
    "PeerReport",
    "PeerSource",
    "Registration",
    "RegistrationAnswer",
    "SCHEMAS",
    "SyncAction",
    "SyncNotice",
    "parse_model_reports",
    "transfer_totals",
    "validate_node_id",
    "validate_node_secret",
    "validate_url",
]

#: The protocol's schemas for the router's OpenAPI ``components.schemas``.
SCHEMAS: dict[str, dict[str, Any]] = {
    "ManifestFile": ManifestFile.SCHEMA,
    "Manifest": Manifest.SCHEMA,
    "PeerSource": PeerSource.SCHEMA,
    "PeerReport": PeerReport.SCHEMA,
    "ModelReport": ModelReport.SCHEMA,
    "ModelReports": ModelReport.LIST_SCHEMA,
    "NodeRegistration": Registration.SCHEMA,
    "Heartbeat": Heartbeat.SCHEMA,
    "NodeRegistered": RegistrationAnswer.SCHEMA,
    "HeartbeatAck": HeartbeatAnswer.SCHEMA,
    "SyncNotice": SyncNotice.SCHEMA,
}
