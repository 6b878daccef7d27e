"""Tool-call syntax per template family: detection, parsing (recorded outputs), streaming."""

from __future__ import annotations

import json

import pytest
from llmlb.node.inference import tool_calls as tc

NAMES = {"get_weather", "get_time"}

# Recorded answers of each family (Qwen 2.5 / Hermes 3, Llama 3.1, Mistral v3 and v11).
HERMES_TWO = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
LLAMA3_ONE = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA3_TWO = (
    '{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
    '{"name": "get_time", "parameters": {"zone": "CET"}}'
)
MISTRAL_V3 = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]'
MISTRAL_V11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'


def _pairs(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("{% for tool in tools %}<tool_call>{% endfor %}", tc.HERMES),
        ("<|start_header_id|>system{% if tools %}{{ tools }}{% endif %}", tc.LLAMA3),
        ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", tc.MISTRAL),
        ("<start_of_turn>user\n{{ messages }}", tc.HERMES),
    ],
)
def test_family_is_chosen_from_the_template(template, kind):
    assert tc.family(template) == kind


def test_hermes_calls_and_the_text_around_them():
    content, calls = tc.parse(HERMES_TWO, tc.HERMES, NAMES)
    assert content == "Let me check."
    assert _pairs(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_llama3_json_calls():
    assert _pairs(tc.parse(LLAMA3_ONE, tc.LLAMA3, NAMES)[1]) == [("get_weather", {"city": "Paris"})]
    content, calls = tc.parse(LLAMA3_TWO, tc.LLAMA3, NAMES)
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("text", [MISTRAL_V3, MISTRAL_V11])
def test_mistral_calls_both_syntaxes(text):
    content, calls = tc.parse(text, tc.MISTRAL, NAMES)
    assert content == "" and _pairs(calls) == [("get_weather", {"city": "Rome"})]


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("The weather is fine.", tc.HERMES),
        ('<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>', tc.HERMES),  # unknown
        ('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', tc.HERMES),
        ("{not json at all", tc.LLAMA3),
        ("[TOOL_CALLS]oops", tc.MISTRAL),
    ],
)
def test_anything_else_stays_text(text, kind):
    assert tc.parse(text, kind, NAMES) == (text, [])


def _stream(parser: tc.StreamParser, text: str, step: int = 3) -> tuple[str, list]:
    out, calls = "", []
    for i in range(0, len(text), step):
        piece, done = parser.push(text[i : i + step])
        out += piece
        calls += done
    piece, done = parser.flush()
    return out + piece, calls + done


def test_stream_parser_releases_text_and_whole_calls():
    parser = tc.StreamParser(tc.HERMES, NAMES)
    first, done = parser.push("Let me check.\n<tool")
    assert first == "Let me check.\n" and not done  # '<tool' might open a call: held back
    text, calls = _stream(tc.StreamParser(tc.HERMES, NAMES), HERMES_TWO)
    assert text.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    plain, none = _stream(tc.StreamParser(tc.HERMES, NAMES), "A <b>bold</b> claim.")
    assert plain == "A <b>bold</b> claim." and none == []


@pytest.mark.parametrize(("kind", "text"), [(tc.LLAMA3, LLAMA3_TWO), (tc.MISTRAL, MISTRAL_V3)])
def test_stream_parser_for_calls_that_run_to_the_end(kind, text):
    streamed, calls = _stream(tc.StreamParser(kind, NAMES), text)
    assert streamed == "" and calls and calls[0].name == "get_weather"
    words, none = _stream(tc.StreamParser(tc.LLAMA3, NAMES), "Sure, here it is.")
    assert words == "Sure, here it is." and none == []


def test_forced_grammar_names_only_the_allowed_tools():
    tools = [tc.Tool("get_weather", "", {"type": "object",
                                         "properties": {"city": {"type": "string"}}})]
    grammar = tc.grammar(tools, tc.HERMES, parallel=False)
    assert grammar.startswith('root ::= "<tool_call>"')
    assert '\\"get_weather\\"' in grammar and "get_time" not in grammar


def test_a_last_call_cut_short_leaves_the_complete_ones():
    cut = HERMES_TWO[: HERMES_TWO.index('"zone"')]
    content, calls = tc.parse(cut, tc.HERMES, NAMES)
    assert content == "Let me check."
    assert [(c.name, c.complete) for c in calls] == [("get_weather", True), ("get_time", False)]
    assert calls[1].arguments == "{"  # what was written of its arguments


# A forced call cut by max_tokens at every point: the markers never stay text; once the
# name is whole the call is returned with what was written of its arguments.
FORCED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("end", range(len(FORCED_CALL) + 1))
def test_a_call_cut_anywhere_never_leaves_template_text(end):
    text = FORCED_CALL[:end]
    name_whole = '"get_weather"' in text
    args_at = FORCED_CALL.index('{"city"')
    for forced in (False, True):
        parser = tc.StreamParser(tc.HERMES, NAMES, forced=forced)
        pieces = [parser.push(text[i : i + 2]) for i in range(0, len(text), 2)]
        pieces.append(parser.flush(cut=True))
        content = "".join(p[0] for p in pieces)
        calls = [c for p in pieces for c in p[1]]
        assert content == "", (text, content)
        if end >= len("<tool_call>"):  # the whole answer parsed at once agrees
            assert tc.parse(text, tc.HERMES, NAMES)[0] == ""
        if not name_whole:
            assert calls == []
            continue
        (call,) = calls
        assert call.name == "get_weather"
        if call.complete:
            assert json.loads(call.arguments) == {"city": "Paris"}
        else:
            assert FORCED_CALL[args_at:].startswith(call.arguments)


@pytest.mark.parametrize(
    ("kind", "text", "arguments"),
    [
        (tc.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa',
         '{"city": "Pa'),
        (tc.LLAMA3, '{"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_weather", '
         '"parameters": {"ci', '{"ci'),
        (tc.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Ro',
         '{"city": "Ro'),
        (tc.MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Ro', '{"city": "Ro'),
    ],
)
def test_other_families_return_a_cut_last_call(kind, text, arguments):
    content, calls = tc.parse(text, kind, NAMES)
    assert content == ""
    assert calls[-1].name == "get_weather" and not calls[-1].complete
    assert calls[-1].arguments == arguments
    assert all(c.complete for c in calls[:-1])


@pytest.mark.parametrize(
    ("kind", "text"),
    [(tc.MISTRAL, "[TOOL_CALLS]get_wea"), (tc.MISTRAL, "[TOOL_CALLS][{\"na"),
     (tc.HERMES, "<tool_call>\n{\"name\": \"get_wea")],
)
def test_a_call_cut_inside_its_name_is_dropped(kind, text):
    assert tc.parse(text, kind, NAMES) == ("", [])


def test_repeated_calls_are_recognised_whatever_the_key_order():
    first = tc.ToolCall("f", '{"a": 1, "b": [2]}')
    assert first.same_as(tc.ToolCall("f", '{"b": [2], "a": 1}'))
    assert not first.same_as(tc.ToolCall("f", '{"a": 2, "b": [2]}'))
    assert not first.same_as(tc.ToolCall("g", '{"a": 1, "b": [2]}'))
