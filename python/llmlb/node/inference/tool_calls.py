"""Tool calling: the call syntax of a model's template family, its grammar, its parser.

Families, recognised from the chat template:

* ``hermes`` (Hermes, Qwen, and every template that knows no tool syntax of its own):
  ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, one per call.
* ``llama3`` (Llama 3.x JSON calls): the answer is ``{"name": …, "parameters": {…}}``,
  optionally after ``<|python_tag|>``; several calls separated by ``;``.
* ``mistral``: ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]``, or the newer
  ``[TOOL_CALLS]name[ARGS]{…}``.

A template that never mentions tools gets the tools described in a system message, in
the ``hermes`` syntax. With ``tool_choice`` ``required`` or a named function the output is
constrained by a grammar built from the tools' JSON schemas (llama-cpp-python's
converter), so even a small base model answers with a well-formed call.

A call the answer ends inside (cut by ``max_tokens``) never stays text: once its name is
whole it is a :class:`ToolCall` with ``complete`` false and the arguments written so far, as
OpenAI returns a cut call; cut inside its name, it is dropped.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from llmlb.node.inference.schema_grammar import schema_gbnf

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Tool:
    """One function tool of a request."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The tool as chat templates receive it (OpenAI's function-tool shape)."""
        function = {"name": self.name, "description": self.description,
                    "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A parsed call: ``arguments`` as the JSON text OpenAI returns.

    ``complete`` is false for a call the answer ended inside (cut by ``max_tokens``): its
    name is whole, its ``arguments`` are the JSON text written so far, as OpenAI returns a
    call cut short.
    """

    name: str
    arguments: str
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))
    complete: bool = True

    def same_as(self, other: ToolCall) -> bool:
        """The same function with the same arguments (key order aside)."""
        if self.name != other.name:
            return False
        mine, theirs = _loads(self.arguments or "{}"), _loads(other.arguments or "{}")
        return mine is not None and mine == theirs


def family(template: str | None) -> str:
    """The tool-call syntax a chat template's model writes."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and "tools" in text):
        return LLAMA3
    return HERMES


def template_knows_tools(template: str | None) -> bool:
    """Whether a template renders the ``tools`` it is given."""
    return template is not None and "tools" in template


def markers(kind: str) -> tuple[str, ...]:
    """Special texts of a family that must be seen in the output (rendered, not hidden)."""
    return {HERMES: ("<tool_call>", "</tool_call>"), LLAMA3: ("<|python_tag|>",),
            MISTRAL: ("[TOOL_CALLS]", "[ARGS]")}[kind]


def instructions(tools: list[Tool]) -> str:
    """A system message describing ``tools`` for a template that renders none."""
    described = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
        for t in tools
    )
    return (
        "You can call these tools:\n"
        f"{described}\n"
        'To call a tool, answer with <tool_call>{"name": <tool name>, "arguments": <JSON '
        "object>}</tool_call> and nothing else."
    )


def history_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Past calls and results written out, for a template that renders no tool messages."""
    out = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = "".join(
                "<tool_call>" + json.dumps(_name_and_arguments(c)) + "</tool_call>"
                for c in message["tool_calls"]
            )
            out.append({"role": "assistant", "content": (message.get("content") or "") + calls})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"Tool result: {message['content']}"})
        else:
            out.append(message)
    return out


def _name_and_arguments(call: dict[str, Any]) -> dict[str, Any]:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


# -- grammar ---------------------------------------------------------------------------


def call_schema(tool: Tool, kind: str) -> dict[str, Any]:
    """The JSON schema of one call object to ``tool`` in ``kind``'s syntax."""
    key = "parameters" if kind == LLAMA3 else "arguments"
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, key: tool.parameters or {"type": "object"}},
        "required": ["name", key],
        "additionalProperties": False,
    }


def grammar(tools: list[Tool], kind: str, parallel: bool) -> str:
    """GBNF that admits only calls to ``tools`` (one, or several when ``parallel``).

    Raises:
        ValueError: the converter cannot turn a schema into a grammar.
    """
    schema = {"anyOf": [call_schema(t, kind) for t in tools]} if len(tools) > 1 else (
        call_schema(tools[0], kind)
    )
    rules = schema_gbnf(schema)
    rules = re.sub(r"^root ::=", "tool-call ::=", rules, flags=re.MULTILINE)
    if kind == HERMES:
        one, sep = '"<tool_call>" space tool-call space "</tool_call>"', "space"
    elif kind == MISTRAL:
        one, sep = "tool-call", '"," space'
    else:
        one, sep = "tool-call", '";" space'
    calls = f"{one} ({sep} {one})*" if parallel else one
    root = f'root ::= "[TOOL_CALLS]" "[" space {calls} "]"' if kind == MISTRAL else (
        f"root ::= {calls}"
    )
    return f"{root}\n{rules}"


# -- parsing ---------------------------------------------------------------------------

# The head of a call object whose name is whole: ``{"name": "…", "arguments": `` (or
# ``"parameters"``), the arguments key optional (the answer may end before it).
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*(?:,\s*"(?:arguments|parameters)"\s*:\s*)?',
    re.DOTALL,
)


def _call(obj: Any, kind: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _cut_call(fragment: str, kind: str, names: set[str]) -> ToolCall | None:
    """The call an answer ended inside: whole (only its closing marker missing), cut short
    (its name whole and known: the arguments written so far), or ``None`` (dropped)."""
    fragment = fragment.strip()
    whole = _call(_loads(fragment), kind)
    if whole is not None:
        return whole if whole.name in names else None
    head = _CALL_HEAD.match(fragment)
    if head is None:
        return None
    name = _loads(f'"{head.group(1)}"')
    if name not in names:
        return None
    arguments = fragment[head.end() :] if head.group(0).rstrip().endswith(":") else ""
    return ToolCall(name, arguments, complete=False)


def _values(text: str, sep: str) -> tuple[list[Any], str | None]:
    """The JSON values ``text`` holds one after another (``sep`` between them, an optional
    ``]`` after the last), and what follows them when that is not one (``None``: nothing)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text) or text[at] == "]" and values:
            return values, None
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return values, text[at:]
        values.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
        if at < len(text) and text[at] == sep:
            at += 1


def _json_calls(text: str, kind: str, names: set[str], sep: str) -> list[ToolCall] | None:
    """Calls written as JSON objects one after another; the last one may be cut short.
    ``None`` when anything but a last cut call is not a call to a known tool."""
    values, rest = _values(text, sep)
    calls = [_call(v, kind) for v in values]
    if any(c is None or c.name not in names for c in calls):
        return None
    if rest is not None:
        if not rest.lstrip().startswith("{"):
            return None
        cut = _cut_call(rest, kind, names)
        if cut is not None:
            calls.append(cut)
    return calls  # type: ignore[return-value]


def parse(text: str, kind: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """Split a finished answer into its text and its calls (only to tools in ``names``).

    A call the answer ends inside (cut by ``max_tokens``) never stays text: it is returned
    with ``complete`` false when its name is whole, else dropped. Anything else that does
    not parse as a call to a known tool stays text.
    """
    if kind == HERMES:
        calls: list[ToolCall] = []
        for match in _HERMES_CALL.finditer(text):
            inner = match.group(1)
            if not match.group(0).endswith("</tool_call>"):  # the answer ends in this call
                inner = inner[: len(inner) - _partial_suffix(inner, "</tool_call>")]
                if inner.strip() and not inner.lstrip().startswith("{"):
                    return (text, []) if not calls else (_HERMES_CALL.sub("", text).strip(), calls)
                cut = _cut_call(inner, kind, names)
                if cut is not None:
                    calls.append(cut)
                return _HERMES_CALL.sub("", text).strip(), calls
            call = _call(_loads(inner), kind)
            if call is None or call.name not in names:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        return _HERMES_CALL.sub("", text).strip(), calls
    if kind == MISTRAL:
        head, marker, rest = text.partition("[TOOL_CALLS]")
        if not marker:
            return text, []
        rest = rest.strip()
        if rest.startswith("["):
            found = _json_calls(rest[1:], kind, names, ",")
            return (text, []) if found is None else (head.strip(), found)
        calls = []
        parts = rest.split("[TOOL_CALLS]")  # name[ARGS]{…}[TOOL_CALLS]name[ARGS]{…}
        for i, part in enumerate(parts):
            name, args_marker, arguments = part.partition("[ARGS]")
            name = name.strip()
            call = _call({"name": name, "arguments": _loads(arguments)}, kind)
            if call is not None and call.name in names:
                calls.append(call)
                continue
            if i < len(parts) - 1:
                return text, []
            if args_marker and name in names and arguments.lstrip()[:1] in ("", "{"):
                calls.append(ToolCall(name, arguments.strip(), complete=False))
            elif args_marker or not any(n.startswith(name) for n in names):
                return text, []
        return head.strip(), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    found = _json_calls(body, kind, names, ";")
    return (text, []) if not found else ("", found)


class StreamParser:
    """Separates streamed text from calls: text is released as soon as it cannot be the
    start of a call; a call is released when it is complete (or at the end).

    Args:
        kind: the family.
        names: the tools that may be called.
        forced: the output is a call by grammar (nothing is text).
    """

    def __init__(self, kind: str, names: set[str], forced: bool = False):
        self.kind = kind
        self.names = names
        self.forced = forced
        self._buffer = ""
        self._in_call = forced
        self._seen_text = False
        self.calls: list[ToolCall] = []

    def _start_marker(self) -> str:
        return {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]", LLAMA3: "{"}[self.kind]

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add a text delta; the text to emit now and the calls completed by it."""
        content, calls = self._push(text)
        return ("" if self.forced else content), calls

    def _push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        out_text, out_calls = "", list[ToolCall]()
        while True:
            if not self._in_call:
                marker = self._start_marker()
                if self.kind == LLAMA3:
                    stripped = self._buffer.lstrip().removeprefix("<|python_tag|>").lstrip()
                    if self._seen_text or (stripped and not stripped.startswith("{")):
                        if stripped and "<|python_tag|>".startswith(stripped):
                            return out_text, out_calls
                        out_text += self._buffer
                        self._seen_text = bool(self._buffer.strip()) or self._seen_text
                        self._buffer = ""
                        return out_text, out_calls
                    if stripped.startswith("{"):
                        self._in_call = True
                        continue
                    return out_text, out_calls
                at = self._buffer.find(marker)
                if at < 0:
                    keep = _partial_suffix(self._buffer, marker)
                    cut = len(self._buffer) - keep
                    out_text += self._buffer[:cut]
                    self._buffer = self._buffer[cut:]
                    return out_text, out_calls
                out_text += self._buffer[:at]
                self._buffer = self._buffer[at:]
                self._in_call = True
            if self.kind != HERMES:
                return out_text, out_calls  # these calls run to the end of the answer
            end = self._buffer.find("</tool_call>")
            if end < 0:
                return out_text, out_calls
            chunk = self._buffer[: end + len("</tool_call>")]
            self._buffer = self._buffer[end + len("</tool_call>") :]
            self._in_call = False
            _, calls = parse(chunk, self.kind, self.names)
            if calls:
                self.calls.extend(calls)
                out_calls.extend(calls)
            else:
                out_text += chunk

    def flush(self, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """At the end: the remaining text, and the calls it completes (the last one with
        ``complete`` false when the answer ended inside it). ``cut``: the answer was cut
        short (``max_tokens``), so a call's opening marker it ends with is dropped too."""
        rest, self._buffer = self._buffer, ""
        if not rest:
            return "", []
        text, calls = parse(rest, self.kind, self.names)
        if cut and not calls:
            opening = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]", LLAMA3: "<|python_tag|>"}
            text = text[: len(text) - _partial_suffix(text, opening[self.kind])]
        self.calls.extend(calls)
        return ("" if self.forced else text), calls


def _partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
