"""Tests of a key's limits: their validation (llmlb.router.control.limits), the admission
counters (llmlb.router.proxy.admission), the usage tap (llmlb.router.proxy.usage), and the
InferenceProxy enforcing them in-process against the real mock backend."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from llmlb.errors import ApiError
from llmlb.router.control.fleet import FleetView
from llmlb.router.control.keys import KeyEntry
from llmlb.router.control.limits import NO_LIMITS, KeyLimits, parse_limits
from llmlb.router.proxy.admission import Admission, LimitExceeded
from llmlb.router.proxy.key_state import Window, period_bounds
from llmlb.router.proxy.proxy import KEY_SCOPE
from llmlb.router.proxy.usage import UsageTap, ask_for_usage

from tests.test_router_proxy import (
    CHAT,
    MODEL,
    Result,
    call,
    load,
    node,
    running,
    start_mock,
)


@pytest.fixture(scope="module")
def mock(tmp_path_factory) -> str:
    """Base URL of a mock backend shared by the module's tests."""
    proc, base = start_mock(tmp_path_factory.mktemp("mock") / "mock.log")
    yield base
    proc.stop()


class Clock:
    def __init__(self, now: float = 1_765_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- validation ------------------------------------------------------------------------


def test_limits_parse_every_field_and_null_removes():
    limits = parse_limits(
        {
            "rpm": 60,
            "tpm": 1000,
            "max_parallel": 2,
            "budget_tokens": 5000,
            "budget_period": "day",
            "models": ["Org/Model", "acme/*", "team/"],
            "priority": "high",
            "expires_at": "2030-01-01T00:00:00+01:00",
        }
    )
    assert limits.to_dict() == {
        "rpm": 60,
        "tpm": 1000,
        "max_parallel": 2,
        "budget_tokens": 5000,
        "budget_period": "day",
        "models": ["org/model", "acme/*", "team/"],
        "priority": "high",
        "expires_at": "2029-12-31T23:00:00.000Z",
    }
    assert KeyLimits.from_json(limits.to_json()) == limits
    cleared = parse_limits({"rpm": None, "budget_tokens": None, "budget_period": None}, limits)
    assert cleared.rpm is None and cleared.budget_tokens is None and cleared.tpm == 1000
    assert parse_limits({}).empty and NO_LIMITS.to_json() is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rpm": -1}, "rpm"),
        ({"rpm": 0}, "rpm"),
        ({"tpm": 10**12}, "tpm"),
        ({"max_parallel": "2"}, "max_parallel"),
        ({"rpm": 1.5}, "rpm"),
        ({"rpm": True}, "rpm"),
        ({"budget_tokens": 10}, "budget_period"),
        ({"budget_period": "week", "budget_tokens": 10}, "budget_period"),
        ({"budget_period": "day"}, "budget_tokens"),
        ({"models": []}, "models"),
        ({"models": "org/model"}, "models"),
        ({"models": ["../x"]}, "models"),
        ({"models": [3]}, "models"),
        ({"priority": "urgent"}, "priority"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),
        ({"expires_at": 1900000000}, "expires_at"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_limit_values_are_400_naming_the_field(body, field):
    with pytest.raises(ApiError) as info:
        parse_limits(body)
    assert info.value.status == 400 and info.value.param == field
    assert field in info.value.message


def test_allowlist_by_id_and_prefix():
    limits = parse_limits({"models": ["org/a", "acme/*", "team/"]})
    assert limits.allows("org/a") and limits.allows("org/a:q4_k_m")
    assert limits.allows("acme/x") and limits.allows("acme/x/y") and limits.allows("team/z")
    assert not limits.allows("org/ab") and not limits.allows("other/a")
    assert NO_LIMITS.allows("anything")


# -- admission counters ------------------------------------------------------------------


def test_window_slides_by_the_second():
    window = Window()
    window.add(100.2, 3)
    window.add(130.0, 2)
    assert window.used(160.9) == 5  # 100.2 counts until 161.0: a full minute after
    assert window.used(161.0) == 2  # the second 100 left the window
    assert window.frees_in(161.0, 1) == pytest.approx(30.0)
    window.adjust(130, -2)
    assert window.used(161.0) == 0
    assert window.used(10_000.0) == 0


def test_rpm_refuses_with_retry_after_and_admits_after_reset():
    clock = Clock(1000.5)
    admission = Admission(clock)
    limits = parse_limits({"rpm": 3})
    for _ in range(3):
        admission.settle(admission.admit("k", limits, MODEL, 10), 10)
    with pytest.raises(LimitExceeded) as info:
        admission.admit("k", limits, MODEL, 10)
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.retry_after == pytest.approx(60.5)
    clock.now = 1061.0  # the second 1000 left the sliding minute
    admission.admit("k", limits, MODEL, 10)
    headers = dict(admission.headers(admission.states["k"]))
    assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert headers[b"x-ratelimit-remaining-requests"] == b"2"
    assert headers[b"x-ratelimit-reset-requests"] == b"1m1s"


def test_max_parallel_and_allowlist():
    admission = Admission(Clock())
    limits = parse_limits({"max_parallel": 1, "models": ["org/other"]})
    with pytest.raises(LimitExceeded) as info:
        admission.admit("k", limits, MODEL, 1)
    assert info.value.status == 403 and info.value.code == "model_not_allowed"
    ticket = admission.admit("k", limits, "org/other", 1)
    with pytest.raises(LimitExceeded) as info:
        admission.admit("k", limits, "org/other", 1)
    assert info.value.status == 429 and info.value.retry_after == 1.0
    admission.settle(ticket, 0)
    admission.settle(ticket, 0)  # settling twice counts once
    admission.admit("k", limits, "org/other", 1)


def test_tpm_reserves_at_admission_and_settles_from_usage():
    clock = Clock(5000.0)
    admission = Admission(clock)
    limits = parse_limits({"tpm": 100})
    first = admission.admit("k", limits, MODEL, 60)
    with pytest.raises(LimitExceeded):  # 60 reserved + 60 > 100
        admission.admit("k", limits, MODEL, 60)
    admission.settle(first, 20)  # the node reported 20: 80 left
    second = admission.admit("k", limits, MODEL, 60)
    headers = dict(admission.headers(second.state))
    assert headers[b"x-ratelimit-remaining-tokens"] == b"20"
    admission.settle(second, None)  # no report: the reservation stands
    assert admission.states["k"].tokens.used(clock.now) == 80


def test_budget_runs_out_and_resets_at_the_period():
    clock = Clock(1_765_065_600.0 + 3600)  # 2025-12-07T01:00Z
    admission = Admission(clock)
    limits = parse_limits({"budget_tokens": 100, "budget_period": "day"})
    running_one = admission.admit("k", limits, MODEL, 30)
    admission.settle(admission.admit("k", limits, MODEL, 30), 90)
    # 90 spent, 30 reserved by the running request: the next one is refused.
    with pytest.raises(LimitExceeded) as info:
        admission.admit("k", limits, MODEL, 1)
    assert info.value.code == "insufficient_quota" and info.value.status == 429
    assert info.value.retry_after == pytest.approx(23 * 3600)
    admission.settle(running_one, 50)  # the running request finishes: 140 spent
    clock.now += 23 * 3600  # the next UTC day
    admission.admit("k", limits, MODEL, 1)
    assert period_bounds("month", 1_765_065_600.0) == ("2025-12", 1_767_225_600.0)


# -- usage tap -----------------------------------------------------------------------------


def _chunk(doc: dict) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def test_tap_reads_and_strips_the_usage_chunk_across_chunk_boundaries():
    usage_event = _chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
    stream = _chunk({"choices": [{"delta": {"content": "a"}}]}) + usage_event + b"data: [DONE]\n\n"
    for strip in (True, False):
        for cut in range(1, len(stream)):
            tap = UsageTap(sse=True, strip=strip)
            out = tap.feed(stream[:cut]) + tap.feed(stream[cut:]) + tap.finish()
            assert tap.usage is not None and tap.usage.total == 12
            assert out == (stream.replace(usage_event, b"") if strip else stream)


def test_tap_reads_every_dialect():
    anthropic = (
        b"event: message_start\n" + _chunk({"message": {"usage": {"input_tokens": 4}}})
        + b"event: message_delta\n"
        + _chunk({"usage": {"input_tokens": 4, "output_tokens": 6, "cache_read_input_tokens": 2}})
    )  # fmt: skip
    tap = UsageTap(sse=True)
    assert tap.feed(anthropic) == anthropic
    assert (tap.usage.prompt, tap.usage.completion, tap.usage.cached) == (4, 6, 2)
    responses = _chunk({"type": "response.completed", "response": {"usage": {
        "input_tokens": 3, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 1}}}})
    tap = UsageTap(sse=True)
    tap.feed(responses)
    assert (tap.usage.prompt, tap.usage.completion, tap.usage.cached) == (3, 1, 1)
    whole = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}})
    tap = UsageTap(sse=False)
    assert tap.feed(whole[:5]) + tap.feed(whole[5:]) == whole
    tap.finish()
    assert tap.usage.total == 10


def test_ask_for_usage_only_when_the_client_did_not():
    doc = {"stream": True}
    assert ask_for_usage("/v1/chat/completions", doc)
    assert doc["stream_options"] == {"include_usage": True}
    assert not ask_for_usage("/v1/chat/completions", {"stream": True, "stream_options": {
        "include_usage": True}})
    assert not ask_for_usage("/v1/chat/completions", {"stream": False})
    assert not ask_for_usage("/v1/messages", {"stream": True})


# -- through the proxy ------------------------------------------------------------------


async def limited_call(
    proxy, payload: dict, entry: KeyEntry | None, path: str = "/v1/chat/completions"
) -> Result:
    """One request through the proxy as the app hands it over: with the key's entry."""
    return await call(
        proxy, payload, path, scope_extra=None if entry is None else {KEY_SCOPE: entry}
    )


def _entry(**limits) -> KeyEntry:
    return KeyEntry("key_t", "api", parse_limits(limits))


def test_proxy_enforces_rpm_with_headers_in_both_shapes(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock))
        async with running(fleet) as proxy:
            entry = _entry(rpm=2)
            for remaining in ("1", "0"):
                res = await limited_call(proxy, CHAT, entry)
                assert res.status == 200
                assert res.headers["x-ratelimit-limit-requests"] == "2"
                assert res.headers["x-ratelimit-remaining-requests"] == remaining
            res = await limited_call(proxy, CHAT, entry)
            assert res.status == 429 and int(res.headers["retry-after"]) >= 1
            assert res.json()["error"]["code"] == "rate_limit_exceeded"
            assert res.headers["x-ratelimit-remaining-requests"] == "0"
            messages = {"model": MODEL, "max_tokens": 5, "messages": [
                {"role": "user", "content": "hi"}]}
            res = await limited_call(proxy, messages, entry, path="/v1/messages")
            assert res.status == 429
            assert res.json() == {"type": "error", "error": {
                "type": "rate_limit_error", "message": res.json()["error"]["message"]}}
            res = await limited_call(proxy, CHAT, None)  # an unlimited key: as before
            assert res.status == 200 and "x-ratelimit-limit-requests" not in res.headers

    asyncio.run(scenario())


def test_proxy_refuses_a_model_outside_the_allowlist(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock))
        async with running(fleet) as proxy:
            res = await limited_call(proxy, CHAT, _entry(models=["org/other"]))
            assert res.status == 403 and res.json()["error"]["code"] == "model_not_allowed"
            res = await limited_call(proxy, CHAT, _entry(models=["org/*"]))
            assert res.status == 200

    asyncio.run(scenario())


def test_proxy_settles_tokens_from_usage_and_strips_the_chunk_it_asked_for(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock))
        async with running(fleet) as proxy:
            entry = _entry(tpm=100_000)
            res = await limited_call(proxy, {**CHAT, "max_tokens": 50}, entry)
            assert res.status == 200  # the mock reports 12 + 9 tokens
            state = proxy.admission.states["key_t"]
            assert state.tokens.total == 21 and state.inflight == 0
            res = await limited_call(proxy, {**CHAT, "stream": True}, entry)
            events = res.events()
            assert events[-1] == b"[DONE]" and not any(b'"usage"' in e for e in events)
            assert state.tokens.total == 21 + 31  # the usage chunk settled it
            asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            res = await limited_call(proxy, asked, entry)
            assert sum(b'"usage"' in e for e in res.events()) == 1  # the client's own
            assert state.tokens.total == 21 + 31 + 31
            assert res.headers["x-ratelimit-limit-tokens"] == "100000"

    asyncio.run(scenario())


def test_proxy_budget_exhausted_is_insufficient_quota(mock):
    async def scenario() -> None:
        fleet = FleetView()
        load(fleet, node("n1", mock))
        async with running(fleet) as proxy:
            entry = _entry(budget_tokens=30, budget_period="month")
            assert (await limited_call(proxy, CHAT, entry)).status == 200  # 21 used
            assert (await limited_call(proxy, CHAT, entry)).status == 200  # 42: over now
            res = await limited_call(proxy, CHAT, entry)
            assert res.status == 429 and res.json()["error"]["code"] == "insufficient_quota"
            assert res.headers["x-ratelimit-remaining-tokens"] == "0"

    asyncio.run(scenario())
