"""Budgets a JSON schema, a regex ``pattern`` or a GBNF grammar must fit before compilation.

llama-cpp-python's schema converter writes a bounded repetition (``maxLength``,
``maxItems``, ``{m,n}`` in a pattern) out as nested groups, one per count; llama.cpp's
grammar parser recurses once per group, and its sampler keeps one stack per way the text
read so far can be parsed. So a count of 20,000 overflows the C stack, a count of 10^9
exhausts memory while the converter builds the text, nested counted repetitions
(``(a{0,1000}){0,1000}``) multiply the stacks per token, and thousands of alternatives
(``enum``, ``anyOf``) multiply the work of every token. These checks run in the node's
process on the request's JSON (cheap: one bounded walk) and name the offending field;
the isolated compiler (:mod:`llmlb.node.inference.grammar_compiler`) checks the GBNF it
produced against the same budget before llama.cpp parses it.

The defaults sit well below where compilation or a token's grammar step stops being cheap
on Gemma's 262k vocabulary (measured in the closing note of the issue that added them and
in ``bench/README.md``): any count at most 2,000, nested counts multiplying to at most
4,096, at most 512 alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = ["GrammarBudget", "GrammarBudgetExceeded", "check_gbnf", "check_pattern", "check_schema"]

# Schema keywords whose value is a repetition count the converter writes out.
_COUNT_KEYWORDS = (
    "maxLength",
    "minLength",
    "maxItems",
    "minItems",
    "maxProperties",
    "minProperties",
    "maxContains",
    "minContains",
)
# Keywords whose value is a list of alternatives (each one becomes a grammar branch).
_ALTERNATIVE_KEYWORDS = ("enum", "anyOf", "oneOf", "allOf", "prefixItems")
# Integer bounds become digit-by-digit range rules: their size grows with the digits.
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@dataclass(frozen=True, slots=True)
class GrammarBudget:
    """What one grammar may cost.

    Attributes:
        max_count: any single repetition count (``maxLength``, ``maxItems``, ``{m,n}``…).
        max_nested_product: counted repetitions nested in one another multiply; their
            product along any nesting path in a pattern.
        max_total_count: all counts of one schema or pattern added up (the grammar's size).
        max_alternatives: values of one ``enum``, branches of one ``anyOf``/``oneOf``/
            ``allOf``, ``|`` branches of one pattern.
        max_nodes: subschemas and values in one schema.
        max_pattern_length: characters of one ``pattern``.
        max_number_digits: digits of an integer bound (``minimum``…).
        max_grammar_bytes: the GBNF text the converter produced.
        max_grammar_nesting: parenthesis depth of that text.
    """

    max_count: int = 1000
    max_nested_product: int = 1024
    max_total_count: int = 20_000
    max_alternatives: int = 256
    max_nodes: int = 4096
    max_pattern_length: int = 2048
    max_number_digits: int = 18
    max_grammar_bytes: int = 512 * 1024
    max_grammar_nesting: int = 1100


class GrammarBudgetExceeded(ValueError):
    """A schema, pattern or grammar is over its :class:`GrammarBudget`.

    Attributes:
        where: the location inside the checked document (``properties.s.maxLength``), or
            ``""`` for the document itself.
        reason: what is over which limit.
    """

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}" if where else reason)


def check_schema(schema: Any, budget: GrammarBudget) -> None:
    """Check a JSON schema (any JSON value) against ``budget`` without converting it.

    Raises:
        GrammarBudgetExceeded: naming the keyword's path inside ``schema``.
    """
    nodes = 0
    total = 0
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        nodes += 1
        if nodes > budget.max_nodes:
            raise GrammarBudgetExceeded("", f"more than {budget.max_nodes} subschemas and values")
        if isinstance(node, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key in _COUNT_KEYWORDS:
            value = node.get(key)
            if _is_number(value) and value > budget.max_count:
                raise GrammarBudgetExceeded(
                    _join(path, key), f"{key} {value} is over the limit of {budget.max_count}"
                )
            if _is_number(value) and value > 0:
                total += int(value)
        for key in _ALTERNATIVE_KEYWORDS:
            value = node.get(key)
            if isinstance(value, list) and len(value) > budget.max_alternatives:
                raise GrammarBudgetExceeded(
                    _join(path, key),
                    f"{key} has {len(value)} entries, over the limit of {budget.max_alternatives}",
                )
        for key in _NUMBER_KEYWORDS:
            value = node.get(key)
            if _is_number(value) and abs(value) >= 10**budget.max_number_digits:
                raise GrammarBudgetExceeded(
                    _join(path, key),
                    f"{key} has more than {budget.max_number_digits} digits",
                )
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            try:
                total += check_pattern(pattern, budget)
            except GrammarBudgetExceeded as exc:
                raise GrammarBudgetExceeded(_join(path, "pattern"), exc.reason) from None
        if total > budget.max_total_count:
            raise GrammarBudgetExceeded(
                "", f"its repetition counts add up to more than {budget.max_total_count}"
            )
        for key, value in node.items():
            if isinstance(value, dict | list):
                stack.append((value, _join(path, key)))


def check_pattern(pattern: str, budget: GrammarBudget) -> int:
    """Check a regular expression the way the converter reads it: counted repetitions
    (``{m}``, ``{m,}``, ``{m,n}``) each within ``max_count``, their products along any
    nesting within ``max_nested_product``, ``|`` branches within ``max_alternatives``.

    Returns:
        The pattern's total count (each count times the counts it is nested in).

    Raises:
        GrammarBudgetExceeded: with ``where`` empty (the caller knows the field).
    """
    if len(pattern) > budget.max_pattern_length:
        raise GrammarBudgetExceeded(
            "", f"the pattern is over {budget.max_pattern_length} characters"
        )
    # One frame per open group: the products of the atoms of its sequence so far.
    frames: list[list[int]] = [[]]
    alternatives = [1]
    total = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            frames[-1].append(1)
            i += 2
        elif c == "[":
            i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            frames[-1].append(1)
            i += 1
        elif c == "(":
            frames.append([])
            alternatives.append(1)
            i += 1
        elif c == ")":
            if len(frames) > 1:
                inner = frames.pop()
                alternatives.pop()
                frames[-1].append(max(inner, default=1))
            i += 1
        elif c == "|":
            alternatives[-1] += 1
            if alternatives[-1] > budget.max_alternatives:
                raise GrammarBudgetExceeded(
                    "", f"more than {budget.max_alternatives} '|' branches in one group"
                )
            i += 1
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                break  # the converter refuses it with its own message
            count = _largest_count(pattern[i + 1 : end])
            if count > budget.max_count:
                raise GrammarBudgetExceeded(
                    "", f"the repetition {pattern[i:end + 1]} is over the limit of "
                    f"{budget.max_count}"
                )
            atom = frames[-1].pop() if frames[-1] else 1
            product = atom * max(count, 1)
            if product > budget.max_nested_product:
                raise GrammarBudgetExceeded(
                    "", f"nested repetitions multiply to {product}, over the limit of "
                    f"{budget.max_nested_product}"
                )
            frames[-1].append(product)
            total += product
            i = end + 1
        else:
            if c not in "*+?^$":
                frames[-1].append(1)
            i += 1
    return total


def check_gbnf(grammar: str, budget: GrammarBudget) -> None:
    """Check converted GBNF text: its size and its parenthesis depth (llama.cpp's parser
    recurses once per level).

    Raises:
        GrammarBudgetExceeded: with ``where`` empty.
    """
    if len(grammar) > budget.max_grammar_bytes:
        raise GrammarBudgetExceeded(
            "", f"the grammar is {len(grammar)} bytes, over the limit of {budget.max_grammar_bytes}"
        )
    depth = deepest = 0
    quoted = bracketed = False
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c == "\\" and (quoted or bracketed):
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif bracketed:
            bracketed = c != "]"
        elif c == '"':
            quoted = True
        elif c == "[":
            bracketed = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "#":
            newline = grammar.find("\n", i)
            i = n if newline < 0 else newline
            continue
        i += 1
    if deepest > budget.max_grammar_nesting:
        raise GrammarBudgetExceeded(
            "", f"the grammar nests {deepest} groups deep, over the limit of "
            f"{budget.max_grammar_nesting}"
        )


def _largest_count(body: str) -> int:
    largest = 0
    for part in body.split(","):
        part = part.strip()
        if part.isdigit():
            largest = max(largest, int(part) if len(part) < 12 else 10**12)
    return largest


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
