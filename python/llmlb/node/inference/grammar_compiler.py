"""Grammars for ``response_format`` and forced tool calls, built where they cannot hurt.

A request's JSON schemas are first checked against the :class:`GrammarBudget` in this
process (one cheap walk that names the field). What passes is converted to GBNF and parsed
by llama.cpp in a small pool of child processes (:mod:`.grammar_worker`), each with an
address-space cap and a time limit per grammar: a converter or parser that crashes, loops
or allocates without end costs that child, never the node, and never blocks its event
loop. Results (grammars and refusals) are cached by request content, since agents send the
same tools with every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections import OrderedDict
from typing import Any

import orjson

from llmlb.node.inference.grammar_budget import GrammarBudget

__all__ = ["GrammarCompiler", "GrammarRefused"]

logger = logging.getLogger(__name__)


class GrammarRefused(ValueError):
    """A schema or tool list cannot be made into a grammar (the message says why)."""


class GrammarCompiler:
    """Builds GBNF in isolated child processes.

    Args:
        budget: what one grammar may cost (also enforced on the GBNF in the children).
        timeout_s: how long one conversion and parse may take before its child is killed.
        memory_bytes: address-space cap of each child (0: none).
        workers: children at most, each working on one grammar at a time.
        cache_size: answers remembered.
    """

    def __init__(
        self,
        budget: GrammarBudget | None = None,
        *,
        timeout_s: float = 5.0,
        memory_bytes: int = 2 << 30,
        workers: int = 2,
        cache_size: int = 512,
    ):
        self.budget = budget or GrammarBudget()
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, str | GrammarRefused] = OrderedDict()
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers = workers
        self._all: list[_Worker] = []

    async def schema(self, schema: Any) -> str:
        """GBNF for values matching the JSON schema ``schema``.

        Raises:
            GrammarRefused: the converter, the budget or llama.cpp refused it.
        """
        return await self._build({"schema": schema})

    async def tools(self, tools: list[dict[str, Any]], kind: str, parallel: bool) -> str:
        """GBNF admitting only calls to ``tools`` (``{name, description, parameters}``
        each) in ``kind``'s syntax (see :func:`llmlb.node.inference.tool_calls.grammar`).

        Raises:
            GrammarRefused: as :meth:`schema`.
        """
        return await self._build({"tools": tools, "kind": kind, "parallel": parallel})

    async def close(self) -> None:
        """Stop the children and wait for them (briefly)."""
        for worker in self._all:
            await worker.stop()
        self._all.clear()

    async def _build(self, request: dict[str, Any]) -> str:
        line = orjson.dumps(request, option=orjson.OPT_SORT_KEYS) + b"\n"
        known = self._cache.get(line)
        if known is None:
            known = await self._ask(line)
            self._cache[line] = known
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(line)
        if isinstance(known, GrammarRefused):
            raise known
        return known

    async def _ask(self, line: bytes) -> str | GrammarRefused:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self._workers):
                self._idle.put_nowait(_Worker(self))
        worker = await self._idle.get()
        try:
            return await worker.ask(line)
        finally:
            self._idle.put_nowait(worker)


class _Worker:
    """One child process, started on first use and again after it died or was killed."""

    def __init__(self, owner: GrammarCompiler):
        self.owner = owner
        self.proc: asyncio.subprocess.Process | None = None

    async def ask(self, line: bytes) -> str | GrammarRefused:
        owner = self.owner
        try:
            proc = await self._started()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line)
            await proc.stdin.drain()
            answer = await asyncio.wait_for(proc.stdout.readline(), owner.timeout_s)
        except TimeoutError:
            await self.stop()
            return GrammarRefused(f"building its grammar took longer than {owner.timeout_s:g} s")
        except (OSError, ConnectionError) as exc:
            await self.stop()
            return GrammarRefused(f"the grammar compiler failed on it ({exc})")
        if not answer:  # the child died on this request: a crash or the memory cap
            code = await self.stop()
            return GrammarRefused(f"building its grammar crashed the compiler (exit {code})")
        reply = orjson.loads(answer)
        if "error" in reply:
            return GrammarRefused(reply["error"])
        return reply["grammar"]

    async def _started(self) -> asyncio.subprocess.Process:
        if self.proc is None or self.proc.returncode is not None:
            if self.proc is not None:
                await self.stop()
            owner = self.owner
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llmlb.node.inference.grammar_worker",
                orjson.dumps(dataclasses.asdict(owner.budget)).decode(),
                str(owner.memory_bytes),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,  # llama.cpp prints whole grammars there
                limit=owner.budget.max_grammar_bytes * 8,
            )
            if self not in owner._all:
                owner._all.append(self)
        return self.proc

    async def stop(self) -> int | None:
        """Kill the child (if it still runs), reap it and close its pipes; its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            logger.info("grammar compiler pid %d stopped", proc.pid)
        if proc.stdin is not None:
            proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 2.0)
        return proc.returncode
