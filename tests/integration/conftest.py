"""SDK clients of a module's ``fleet`` (a router URL and an api key): each module that uses
them defines its own module-scoped ``fleet`` fixture, which these pick up."""

from __future__ import annotations

import anthropic
import openai
import pytest


@pytest.fixture(scope="module")
def oai(fleet):
    """OpenAI's SDK pointed at the router, no retries."""
    return openai.OpenAI(
        base_url=f"{fleet['router']}/v1", api_key=fleet["key"], max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def claude(fleet):
    """Anthropic's SDK pointed at the router (it sends the key as ``x-api-key``)."""
    return anthropic.Anthropic(
        base_url=fleet["router"], api_key=fleet["key"], max_retries=0, timeout=120
    )
