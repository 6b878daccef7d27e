"""JSON schema → GBNF, with strings that are valid JSON.

llama-cpp-python's converter lets a string hold any character but ``"`` and ``\\``, raw
newlines and other control characters included, which JSON forbids (RFC 8259 §7): a
model constrained by it can answer ``{"a": "x<LF>y"}``, which no JSON parser accepts.
llama.cpp's own converter excludes them; this applies the same rule.
"""

from __future__ import annotations

import json
import re
from typing import Any

_CHAR_RULE = re.compile(r'^(char ::= )\[\^"\\\\\](.*)$', re.MULTILINE)
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'


def schema_gbnf(schema: dict[str, Any]) -> str:
    """GBNF admitting the JSON documents valid under ``schema``.

    Raises:
        ValueError: the converter cannot turn the schema into a grammar (it also raises
            bare exceptions; callers treat any as a refusal).
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar = json_schema_to_gbnf(json.dumps(schema))
    return _CHAR_RULE.sub(lambda m: m.group(1) + _JSON_CHAR + m.group(2), grammar)
