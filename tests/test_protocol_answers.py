"""llmlb.protocol: the router's registration and heartbeat answers and the sync notice."""

from __future__ import annotations

import orjson
import pytest
from llmlb.errors import ApiError
from llmlb.protocol import (
    SCHEMAS,
    HeartbeatAnswer,
    RegistrationAnswer,
    SyncAction,
    SyncNotice,
)


def test_registration_answer_round_trips_with_every_field() -> None:
    answer = RegistrationAnswer("node-1", 2.5, "approved", "fleet-abc", "sync-xyz")
    wire = answer.to_dict()
    assert wire == {
        "node_id": "node-1",
        "heartbeat_interval_s": 2.5,
        "approval": "approved",
        "peer_token": "fleet-abc",
        "sync_token": "sync-xyz",
    }
    assert RegistrationAnswer.from_dict(orjson.loads(orjson.dumps(wire))) == answer


def test_pending_answer_carries_no_peer_token() -> None:
    wire = HeartbeatAnswer("node-1", 5.0, "pending", None).to_dict()
    assert wire == {"node_id": "node-1", "heartbeat_interval_s": 5.0, "approval": "pending"}


def test_answers_from_older_or_odd_routers_read_missing_fields_as_absent() -> None:
    old = RegistrationAnswer.from_dict({"node_id": "n", "heartbeat_interval_s": 3})
    assert old == RegistrationAnswer("n", 3.0, None, None, None)
    odd = HeartbeatAnswer.from_dict(
        {"node_id": 7, "heartbeat_interval_s": True, "approval": 1, "peer_token": ""}
    )
    assert odd == HeartbeatAnswer(None, None, None, None)
    assert HeartbeatAnswer.from_dict({"heartbeat_interval_s": 0}).heartbeat_interval_s is None


def test_schemas_name_the_wire_fields() -> None:
    assert set(SCHEMAS["NodeRegistered"]["properties"]) == set(
        RegistrationAnswer("n", 1.0, "approved", "p", "s").to_dict()
    )
    assert set(SCHEMAS["HeartbeatAck"]["properties"]) == set(
        HeartbeatAnswer("n", 1.0, "approved", "p").to_dict()
    )
    assert set(SCHEMAS["SyncNotice"]["properties"]) == set(SyncNotice(["a"]).to_dict())
    assert SCHEMAS["SyncNotice"]["properties"]["action"]["enum"] == [a.value for a in SyncAction]


@pytest.mark.parametrize("action", ["register", "delete", "retry"])
def test_sync_notice_normalises_ids_and_keeps_the_action(action: str) -> None:
    notice = SyncNotice.parse({"models": ["Org/Model", "a:Q4_K_M"], "action": action})
    assert notice == SyncNotice(["org/model", "a:q4_k_m"], action)
    assert SyncNotice.parse(notice.to_dict()) == notice
    assert SyncNotice.parse({"models": []}).action == "register"


@pytest.mark.parametrize(
    ("body", "code", "param", "message"),
    [
        ({}, "invalid_request_error", None, "'models' must be a list of ids"),
        ({"models": "a"}, "invalid_request_error", None, "'models' must be a list of ids"),
        ({"models": [1]}, "invalid_request_error", None, "'models' must be a list of ids"),
        ({"models": ["a//b"]}, "invalid_model_id", "models", None),
        (
            {"models": ["a"], "action": "wipe"},
            "invalid_request_error",
            None,
            "'action' must be 'register', 'delete' or 'retry'",
        ),
    ],
)
def test_sync_notice_refuses_bad_bodies(
    body: dict[str, object], code: str, param: str | None, message: str | None
) -> None:
    with pytest.raises(ApiError) as caught:
        SyncNotice.parse(body)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, param)
    if message is not None:
        assert caught.value.message == message
