"""llmlb.protocol: model reports (their wire form and their validation on the router) and a
node's report of a bad peer."""

from __future__ import annotations

import pytest
from llmlb.errors import ApiError
from llmlb.protocol import ModelReport, PeerReport, parse_model_reports

SECRET = "s" * 16


def test_a_report_names_id_and_state_then_only_the_fields_known_in_order() -> None:
    report = ModelReport(
        "org/m",
        "downloading",
        progress=(5, 10),
        error="slow",
        size_bytes=10,
        servable=False,
        retry_at=7,
        bytes_from_peers=3,
        serves_peers=False,
    )
    wire = report.to_dict()
    assert list(wire) == [
        "id",
        "state",
        "progress",
        "error",
        "size_bytes",
        "servable",
        "retry_at",
        "bytes_from_peers",
        "serves_peers",
    ]
    assert wire["progress"] == {"bytes": 5, "total": 10}
    assert wire["servable"] is False and wire["serves_peers"] is False
    assert ModelReport("org/m", "ready").to_dict() == {"id": "org/m", "state": "ready"}


def test_parsed_reports_keep_the_flags_given_and_normalise_ids() -> None:
    (report,) = parse_model_reports(
        [{"id": "Org/M", "status": "ready", "servable": True, "serves_peers": False}]
    )
    assert report == {"id": "org/m", "state": "ready", "servable": True, "serves_peers": False}
    assert parse_model_reports(["org/m"]) == [{"id": "org/m", "state": "ready"}]


@pytest.mark.parametrize(
    ("item", "code", "message"),
    [
        ({"id": 5}, "invalid_request_error", "each model needs a string id"),
        ({"id": "../x"}, "invalid_model_id", None),
        ({"id": "org/m", "servable": "yes"}, "invalid_request_error", "servable must be a boolean"),
        (
            {"id": "org/m", "serves_peers": 1},
            "invalid_request_error",
            "serves_peers must be a boolean",
        ),
    ],
)
def test_a_bad_report_is_a_400_naming_the_field(item, code, message) -> None:
    with pytest.raises(ApiError) as caught:
        parse_model_reports([item])
    assert caught.value.status == 400 and caught.value.code == code
    if message is not None:
        assert caught.value.message == message


def test_a_peer_report_reads_its_model_id_as_a_report_does() -> None:
    body = {"model_id": "Org/M", "node_id": "node-1", "reporter": "node-2", "node_secret": SECRET}
    assert PeerReport.parse(body).model_id == "org/m"
    for bad, code in ((None, "invalid_request_error"), ("a/../b", "invalid_model_id")):
        with pytest.raises(ApiError) as caught:
            PeerReport.parse({**body, "model_id": bad})
        assert caught.value.status == 400 and caught.value.code == code
    with pytest.raises(ApiError) as caught:
        PeerReport.parse({**body, "model_id": 5})
    assert caught.value.message == "model_id must be a string"
