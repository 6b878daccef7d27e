"""The audit log's secret rule (:func:`llmlb.router.control.audit.scrub`)."""

from __future__ import annotations

import pytest
from llmlb.router.control.audit import REDACTED, is_secret_field, scrub


@pytest.mark.parametrize(
    "name",
    ["key", "hf_token", "node_secret", "x-api-key", "Authorization", "apiKey", "HF_TOKEN",
     "password", "client.credentials", "sync_token", "accessToken"],
)  # fmt: skip
def test_a_field_named_with_a_secret_word_is_secret(name):
    assert is_secret_field(name)


@pytest.mark.parametrize(
    "name",
    ["budget_tokens", "tpm", "name", "scope", "repo", "models", "keys", "monkey", "tokenizer"],
)
def test_other_fields_are_not(name):
    assert not is_secret_field(name)


def test_scrub_redacts_at_any_depth_and_keeps_the_rest():
    change = {
        "repo": "org/x",
        "budget_tokens": 10,
        "hf_token": "hf_abc",
        "nested": [{"Authorization": "Bearer sk"}, {"node_secret": {"deep": "s"}}, 3],
    }
    assert scrub(change) == {
        "repo": "org/x",
        "budget_tokens": 10,
        "hf_token": REDACTED,
        "nested": [{"Authorization": REDACTED}, {"node_secret": REDACTED}, 3],
    }
