"""Tool calls out of generated text (server/tool_calls.py) in both conventions, whole and streamed, and
the tools request fields (server/tools.py): shapes, 400s naming the field, and the call grammar."""
from __future__ import annotations

import json
import random

import pytest

from aircupy.gguf.tool_template import HERMES, LLAMA3_JSON
from aircupy.server import tools
from aircupy.server.apierror import APIError
from aircupy.server.protocol import parse_chat
from aircupy.server.tool_calls import ToolCallStream, parse

USER = [{"role": "user", "content": "hi"}]


def call(name, args):
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(args)}}}\n</tool_call>'


def named(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


# ---- Hermes -------------------------------------------------------------------------------------------

def test_hermes_one_call_is_the_whole_answer():
    content, calls = parse(call("get_weather", {"city": "Paris"}), HERMES)
    assert content is None and named(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].to_dict()["type"] == "function"


def test_hermes_several_calls_and_text_outside_them():
    text = "Let me check.\n" + call("a", {"x": 1}) + "\n" + call("b", {}) + "\nDone."
    content, calls = parse(text, HERMES)
    assert named(calls) == [("a", {"x": 1}), ("b", {})]
    assert content == "Let me check.Done."   # the blanks next to the calls go, the words stay
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("bad", [
    "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": }\n</tool_call>",      # not JSON
    "<tool_call>\n[1, 2]\n</tool_call>",                                          # not an object
    "<tool_call>\n{\"arguments\": {}}\n</tool_call>",                             # no name
    "<tool_call>\n{\"name\": \"a\", \"arguments\": 3}\n</tool_call>",             # arguments not an object
    "<tool_call>\n{\"name\": \"a\", \"arguments\": {}",                            # open and incomplete
    "<tool_call",                                                                 # a marker cut short
])
def test_hermes_malformed_blocks_stay_content(bad):
    text = "Sure. " + bad
    assert parse(text, HERMES) == (text, [])


def test_hermes_unknown_function_stays_content_and_known_one_is_a_call():
    text = call("nope", {}) + call("get_weather", {"city": "Oslo"})
    content, calls = parse(text, HERMES, names={"get_weather"})
    assert named(calls) == [("get_weather", {"city": "Oslo"})]
    assert content == call("nope", {})


def test_hermes_block_left_open_at_the_end_is_a_call_when_whole():
    content, calls = parse('<tool_call>\n{"name": "a", "arguments": {"k": "v"}}\n', HERMES)
    assert content is None and named(calls) == [("a", {"k": "v"})]


def test_hermes_arguments_as_json_text_are_decoded():
    text = '<tool_call>{"name": "a", "arguments": "{\\"k\\": 2}"}</tool_call>'
    assert named(parse(text, HERMES)[1]) == [("a", {"k": 2})]


def test_hermes_at_most_one_call_without_parallel_calls():
    second = call("b", {})
    content, calls = parse(call("a", {}) + "\n" + second, HERMES, max_calls=1)
    assert named(calls) == [("a", {})] and content == second


def test_text_without_calls_is_content_unchanged():
    for text in ("  plain answer \n", "a < b and <tool>", "", "\n\n"):
        assert parse(text, HERMES) == (text, [])
        assert parse(text, LLAMA3_JSON) == (text, [])


# ---- Llama 3.1 JSON ---------------------------------------------------------------------------------

def test_llama3_json_call_with_and_without_python_tag():
    for prefix in ("", "<|python_tag|>", "  "):
        content, calls = parse(prefix + '{"name": "get_weather", "parameters": {"city": "Rome"}}', LLAMA3_JSON)
        assert content is None and named(calls) == [("get_weather", {"city": "Rome"})]


def test_llama3_json_several_calls_separated_by_semicolons():
    text = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert named(parse(text, LLAMA3_JSON)[1]) == [("a", {"x": 1}), ("b", {})]
    assert parse(text, LLAMA3_JSON, max_calls=1) == (text, [])   # two calls where one is allowed: text


@pytest.mark.parametrize("text", [
    'The answer is {"name": "a", "parameters": {}}',     # prose first: not a call
    '{"name": "a", "parameters": {}} and more',          # trailing prose
    '{"name": "a", "parameters": ',                      # cut short
    '{"city": "Rome"}',                                  # JSON but not a call
])
def test_llama3_json_anything_but_calls_is_content(text):
    assert parse(text, LLAMA3_JSON) == (text, [])


# ---- streaming ---------------------------------------------------------------------------------------

STREAM_CASES = [
    (HERMES, "Checking. " + call("a", {"q": "x y"}) + "\n" + call("b", {"n": [1, 2]}) + " ok"),
    (HERMES, "no calls here <tool but < and >\n"),
    (HERMES, call("a", {}) + "<tool_call>broken</tool_call>"),
    (LLAMA3_JSON, '<|python_tag|>{"name": "a", "parameters": {"q": "z"}}'),
    (LLAMA3_JSON, "Just text {not a call}"),
]


def _streamed(convention, text, sizes):
    s = ToolCallStream(convention)
    events, pos = [], 0
    while pos < len(text):
        n = sizes.pop() if sizes else 1
        events += s.feed(text[pos:pos + n])
        pos += n
    return events + s.finish()


@pytest.mark.parametrize("convention, text", STREAM_CASES)
def test_streamed_pieces_reassemble_to_the_whole_parse(convention, text):
    content, calls = parse(text, convention)
    rng = random.Random(7)
    for trial in range(30):
        sizes = [rng.randint(1, 12) for _ in range(len(text))] if trial else []   # trial 0: char by char
        events = _streamed(convention, text, sizes)
        got_calls = [e[1] for e in events if e[0] == "call"]
        got_text = "".join(e[1] for e in events if e[0] == "content")
        assert named(got_calls) == named(calls)
        assert got_text == (text if not calls else (content or ""))


def test_stream_holds_back_a_possible_marker_and_blanks_before_it():
    s = ToolCallStream(HERMES)
    assert s.feed("Hello <tool_") == [("content", "Hello")]
    assert s.feed("call>") == []
    events = s.feed('{"name": "a", "arguments": {}}</tool_call>')
    assert [e[0] for e in events] == ["call"] and s.n_calls == 1
    s = ToolCallStream(HERMES)
    assert s.feed("a <tool") == [("content", "a")]
    assert s.feed("kit>") == [("content", " <toolkit>")]   # not a marker after all: released as it was


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError):
        ToolCallStream("xml")


# ---- request fields ----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def test_tools_parse_defaults_and_choices():
    req = parse_chat({"messages": USER, "tools": [WEATHER]})
    assert req.tools.choice == "auto" and req.tools.parallel and req.tools.names == {"get_weather"}
    req = parse_chat({"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function",
                                                                           "function": {"name": "get_weather"}},
                      "parallel_tool_calls": False})
    assert (req.tools.choice, req.tools.function, req.tools.max_calls) == ("function", "get_weather", 1)
    assert parse_chat({"messages": USER, "tools": []}).tools is None
    bare = parse_chat({"messages": USER, "tools": [{"type": "function", "function": {"name": "ping"}}]})
    assert bare.tools.tools[0].parameters == tools.NO_PARAMETERS


@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools[0].function.strict"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": "get_weather"}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_fields_are_400_naming_the_field(extra, param):
    with pytest.raises(APIError) as ei:
        parse_chat({"messages": USER, **extra})
    assert (ei.value.status, ei.value.param) == (400, param)


def test_history_with_tool_calls_and_tool_results_is_read():
    msgs = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    got = parse_chat({"messages": msgs}).prompts[0]
    assert got[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert got[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("msg, param", [
    ({"role": "tool", "content": "x"}, "messages[1].tool_call_id"),
    ({"role": "assistant", "tool_calls": "x"}, "messages[1].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "messages[1].tool_calls[0].function.name"),
])
def test_bad_tool_turns_are_400_naming_the_field(msg, param):
    with pytest.raises(APIError) as ei:
        parse_chat({"messages": [*USER, msg]})
    assert (ei.value.status, ei.value.param) == (400, param)


def test_call_grammar_compiles_for_each_convention_and_choice():
    from aircupy.engine.constraint import JSON_OPTIONS, Constraint
    for body in ({"tool_choice": "required"}, {"tool_choice": "required", "parallel_tool_calls": False},
                 {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}):
        tr = parse_chat({"messages": USER, "tools": [WEATHER, {"type": "function", "function": {"name": "ping"}}],
                         **body}).tools
        for conv in (HERMES, LLAMA3_JSON):
            tr.convention = conv
            lark = tools.call_grammar(tr, JSON_OPTIONS)
            assert ("(" in lark.splitlines()[0]) == (tr.choice == "required" and tr.parallel)
            assert ("ping" in lark) == (tr.choice == "required")
            assert Constraint.compile("grammar", lark).kind == "grammar"
