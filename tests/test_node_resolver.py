"""Resolver rules that need no processes: the retry backoff and the servable formats."""

from __future__ import annotations

from llmlb.node.models import runtimes
from llmlb.node.models.resolver import RETRY_MAX_S, ModelRecord, retry_delay


def test_retry_backoff_doubles_from_one_second_to_ten_minutes():
    assert [retry_delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert retry_delay(11) == RETRY_MAX_S == 600.0
    assert retry_delay(10_000) == 600.0


def test_failed_report_carries_attempts_and_retry_time():
    report = ModelRecord("failed", error="HTTP 503", attempts=2, retry_at=1_700_000_000.6)
    assert report.to_dict("org/m") == {
        "id": "org/m",
        "state": "failed",
        "progress": None,
        "error": "HTTP 503",
        "attempts": 2,
        "retry_at": 1_700_000_001,
    }
    assert "attempts" not in ModelRecord("downloading").to_dict("org/m")


def test_llama_cpp_serves_gguf_only():
    assert runtimes.RUNTIMES == ("llama.cpp",)
    assert runtimes.servable("gguf")
    assert not runtimes.servable("safetensors") and not runtimes.servable(None)
    assert runtimes.not_servable_reason("safetensors") == (
        "no runtime of this node serves safetensors"
    )
