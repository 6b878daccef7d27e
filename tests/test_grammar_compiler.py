"""The isolated grammar compiler: children that convert and parse, and die instead of the node."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from llmlb.node.inference.grammar_budget import GrammarBudget
from llmlb.node.inference.grammar_compiler import GrammarCompiler, GrammarRefused

# A budget that lets through what the in-process checks normally refuse, to reach the child.
OPEN = GrammarBudget(
    max_count=10**10, max_total_count=10**12, max_grammar_bytes=10**9, max_grammar_nesting=10**9
)


def run(coro):
    return asyncio.run(coro)


def test_schema_and_tools_become_grammars():
    async def go():
        compiler = GrammarCompiler()
        try:
            schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
            grammar = await compiler.schema(schema)
            assert "root ::=" in grammar
            tool = {"name": "write_file", "description": "",
                    "parameters": {"type": "object", "properties": {"s": {"type": "string"}}}}
            calls = await compiler.tools([tool], "hermes", False)
            assert '"<tool_call>"' in calls and "write_file" in calls
        finally:
            await compiler.close()

    run(go())


def test_a_memory_bomb_is_refused_by_the_child_and_the_next_grammar_still_builds():
    async def go():
        compiler = GrammarCompiler(OPEN, memory_bytes=1 << 30)
        try:
            with pytest.raises(GrammarRefused, match="memory"):
                await compiler.schema({"type": "string", "maxLength": 10**9})
            assert "root ::=" in await compiler.schema({"type": "string", "maxLength": 8})
        finally:
            await compiler.close()

    run(go())


def test_a_parser_crash_costs_the_child_only():
    async def go():
        compiler = GrammarCompiler(OPEN, workers=1)
        try:
            with pytest.raises(GrammarRefused, match="crashed"):
                # 30,000 nested groups overflow the parse thread's stack in the child
                await compiler.schema({"type": "string", "maxLength": 30000})
            assert "root ::=" in await compiler.schema({"type": "string", "maxLength": 8})
        finally:
            await compiler.close()

    run(go())


def test_a_slow_build_is_killed_at_the_time_limit_and_refusals_are_cached():
    async def go():
        compiler = GrammarCompiler(OPEN, timeout_s=0.001, workers=1)
        try:
            schema = {"type": "string", "maxLength": 500}
            with pytest.raises(GrammarRefused, match="longer than"):
                await compiler.schema(schema)
            first = compiler._all[0].proc
            assert first is None  # killed
            with pytest.raises(GrammarRefused, match="longer than"):
                await compiler.schema(schema)  # answered from the cache: no child started
            assert compiler._all[0].proc is None
        finally:
            await compiler.close()

    run(go())


def test_the_child_checks_the_budget_too():
    async def go():
        small = dataclasses.replace(GrammarBudget(), max_count=5)
        compiler = GrammarCompiler(small)
        try:
            with pytest.raises(GrammarRefused, match="maxLength 6"):
                await compiler.schema({"type": "string", "maxLength": 6})
        finally:
            await compiler.close()

    run(go())
