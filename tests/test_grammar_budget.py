"""Grammar budgets: what a schema, a pattern or a GBNF text may cost before compilation."""

from __future__ import annotations

import pytest
from llmlb.node.inference.grammar_budget import (
    GrammarBudget,
    GrammarBudgetExceeded,
    check_gbnf,
    check_pattern,
    check_schema,
)

BUDGET = GrammarBudget()


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "string", "maxLength": 30000}, "maxLength"),
        ({"type": "string", "minLength": 10**9}, "minLength"),
        ({"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}},
         "properties.s.maxLength"),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 100000}, "maxItems"),
        ({"type": "string", "enum": [f"v{i}" for i in range(40000)]}, "enum"),
        ({"anyOf": [{"const": i} for i in range(300)]}, "anyOf"),
        ({"type": "string", "pattern": "^a{0,100000}$"}, "pattern"),
        ({"type": "string", "pattern": "^(a{0,1000}){0,1000}$"}, "pattern"),
        ({"type": "integer", "minimum": -(10**30)}, "minimum"),
        ({"type": "array", "prefixItems": [{"type": "string", "maxLength": 5000}]},
         "prefixItems[0].maxLength"),
        ({"type": "string", "maxLength": float("inf")}, "maxLength"),
    ],
)
def test_schemas_over_the_budget_are_refused_naming_the_keyword(schema, where):
    with pytest.raises(GrammarBudgetExceeded) as caught:
        check_schema(schema, BUDGET)
    assert caught.value.where == where


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 1000},
        {"type": "array", "items": {"type": "string", "maxLength": 200}, "maxItems": 50},
        {"type": "string", "enum": [f"v{i}" for i in range(256)]},
        {"type": "string", "pattern": "^(a{0,32}){0,32}$"},
        {"type": "string", "pattern": "^[A-Z]{2}-\\d{4}$"},
        {"type": "integer", "minimum": 0, "maximum": 10**12},
        {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    ],
)
def test_ordinary_schemas_fit(schema):
    check_schema(schema, BUDGET)


def test_repetition_counts_add_up_across_a_schema():
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(30)},
    }
    with pytest.raises(GrammarBudgetExceeded, match="add up"):
        check_schema(schema, BUDGET)


def test_too_many_subschemas_are_refused():
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    with pytest.raises(GrammarBudgetExceeded, match="subschemas"):
        check_schema(schema, BUDGET)


def test_a_smaller_budget_applies():
    small = GrammarBudget(max_count=10, max_alternatives=2)
    with pytest.raises(GrammarBudgetExceeded):
        check_schema({"type": "string", "maxLength": 11}, small)
    with pytest.raises(GrammarBudgetExceeded):
        check_schema({"enum": [1, 2, 3]}, small)
    check_schema({"type": "string", "maxLength": 10}, small)


def test_pattern_products_multiply_along_nesting_only():
    assert check_pattern("^a{0,100}b{0,100}$", BUDGET) == 200
    assert check_pattern("^(a{0,10}){0,10}$", BUDGET) == 10 + 100
    with pytest.raises(GrammarBudgetExceeded, match="multiply"):
        check_pattern("^((a{0,16}){0,16}){0,16}$", BUDGET)
    with pytest.raises(GrammarBudgetExceeded, match="branches"):
        check_pattern("^(" + "|".join(["a"] * 300) + ")$", BUDGET)
    with pytest.raises(GrammarBudgetExceeded, match="characters"):
        check_pattern("a" * 5000, BUDGET)


def test_gbnf_depth_and_size():
    nested = "root ::= " + '("a" ' * 2000 + ")?" * 2000
    with pytest.raises(GrammarBudgetExceeded, match="nests 2000"):
        check_gbnf(nested, BUDGET)
    check_gbnf('root ::= "(((" [(] "\\"" ("a")?  # ((((( in a comment', BUDGET)
    with pytest.raises(GrammarBudgetExceeded, match="bytes"):
        check_gbnf("root ::= " + '"a" ' * 200_000, BUDGET)
