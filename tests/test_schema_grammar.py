"""JSON schema grammars admit only JSON strings without raw control characters."""

from __future__ import annotations

from llmlb.node.inference import tool_calls
from llmlb.node.inference.schema_grammar import schema_gbnf

STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | '


def _char_rules(grammar: str) -> list[str]:
    return [line for line in grammar.splitlines() if line.startswith("char ::=")]


def test_a_schema_grammar_excludes_control_characters_from_strings():
    grammar = schema_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    rules = _char_rules(grammar)
    assert len(rules) == 1 and rules[0].startswith(STRICT_CHAR), rules


def test_a_tool_call_grammar_excludes_them_from_arguments():
    tool = tool_calls.Tool(name="write", description="", parameters={
        "type": "object", "properties": {"text": {"type": "string", "maxLength": 40}}})
    for kind in (tool_calls.HERMES, tool_calls.MISTRAL):
        rules = _char_rules(tool_calls.grammar([tool], kind, parallel=True))
        assert len(rules) == 1 and rules[0].startswith(STRICT_CHAR), (kind, rules)
