"""The child process that turns JSON schemas and tool lists into GBNF and compiles it.

Run as ``python -m llmlb.node.inference.grammar_worker BUDGET_JSON MEMORY_BYTES``: it caps
its own address space, then answers one JSON line on stdout for each JSON line on stdin:

* ``{"schema": <schema>}`` or ``{"tools": [{name, description, parameters}], "kind": str,
  "parallel": bool}`` →
* ``{"grammar": <gbnf>}``, or ``{"error": <reason>}`` when the converter, the budget or
  llama.cpp's parser refuses it.

llama.cpp parses the grammar here (without a vocabulary) in a thread with a small stack:
a grammar that parses here parses in the node's threads, whose stacks are larger. A crash,
a runaway or an allocation past the cap ends this process only; the node answers 400.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
from typing import Any

from llmlb import lifecycle
from llmlb.node.inference.grammar_budget import (
    GrammarBudget,
    GrammarBudgetExceeded,
    check_gbnf,
    check_schema,
)
from llmlb.node.inference.schema_grammar import schema_gbnf

# Stack of the thread that parses: well below the 8 MiB of the node's decode threads.
PARSE_STACK_BYTES = 1024 * 1024


def build(request: dict[str, Any], budget: GrammarBudget) -> str:
    """The checked GBNF for ``request`` (see the module docstring).

    Raises:
        ValueError: the converter, the budget or llama.cpp refused it (the message says why).
    """
    if "schema" in request:
        check_schema(request["schema"], budget)
        grammar = schema_gbnf(request["schema"])
    else:
        from llmlb.node.inference import tool_calls

        tools = [tool_calls.Tool(**tool) for tool in request["tools"]]
        for tool in tools:
            check_schema(tool.parameters, budget)
        grammar = tool_calls.grammar(tools, request["kind"], bool(request["parallel"]))
    check_gbnf(grammar, budget)
    if not _parses(grammar):
        raise ValueError("llama.cpp could not parse the grammar it converts to")
    return grammar


def _parses(grammar: str) -> bool:
    import llama_cpp

    result: list[bool] = []

    def parse() -> None:
        sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
        result.append(bool(sampler))
        if sampler:
            llama_cpp.llama_sampler_free(sampler)

    previous = threading.stack_size(PARSE_STACK_BYTES)
    try:
        thread = threading.Thread(target=parse, name="grammar-parse")
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join()
    return bool(result and result[0])


def _answer(line: str, budget: GrammarBudget) -> dict[str, str]:
    try:
        return {"grammar": build(json.loads(line), budget)}
    except GrammarBudgetExceeded as exc:
        return {"error": f"it is over the grammar budget: {exc}"}
    except MemoryError:
        return {"error": "converting it needs more memory than a grammar may use"}
    except RecursionError:
        return {"error": "it nests too deeply to convert"}
    except Exception as exc:  # noqa: BLE001 - the converter raises bare exceptions
        return {"error": str(exc) or type(exc).__name__}


def main(argv: list[str]) -> int:
    """Serve requests on stdin until it closes."""
    lifecycle.die_with_parent()
    budget = GrammarBudget(**json.loads(argv[0]))
    memory = int(argv[1])
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    import llama_cpp  # noqa: F401 - loaded before the first request, not during it

    for line in sys.stdin:
        sys.stdout.write(json.dumps(_answer(line, budget)) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
