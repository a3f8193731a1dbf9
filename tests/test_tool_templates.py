"""Tools through chat templates (gguf/tool_template.py): tools-aware templates get `tools` and the tool
turns as transformers hands them; SmolLM2's and Gemma3's templates, which know nothing of tools, get the
Hermes fallback; the call grammar holds SmolLM2's tokens to a valid call."""
from __future__ import annotations

import json

import pytest

from aircupy.engine import constraint as ec
from aircupy.gguf import tool_template as tt
from aircupy.gguf.chat_template import ChatTemplate
from aircupy.server.protocol import parse_chat
from aircupy.server.tools import call_grammar
from tests.helpers.tool_templates import LLAMA31_STYLE, QWEN_STYLE

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    {"role": "tool", "tool_call_id": "call_2", "content": "warm"},
]


def _with(smol_chat, text):
    tok, _, md = smol_chat
    return ChatTemplate.from_metadata({**md, "tokenizer.chat_template": text}, tok)


def test_conventions_are_read_from_the_template():
    assert tt.convention_of(QWEN_STYLE) == tt.HERMES
    assert tt.convention_of(LLAMA31_STYLE) == tt.LLAMA3_JSON
    assert tt.convention_of("{{ '<|python_tag|>' }}") == tt.LLAMA3_JSON
    assert tt.convention_of("{{ tools }}") == tt.HERMES


def test_a_tools_aware_template_renders_tools_and_tool_turns_itself(smol_chat):
    t = _with(smol_chat, QWEN_STYLE)
    assert t.supports_tools and t.tool_convention == tt.HERMES
    out = t.render(CONVERSATION, tools=[WEATHER])
    assert out.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in out
    # Arguments arrive as objects (the template applies tojson), tool results as one user turn.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in out
    assert ("<|im_start|>user\n<tool_response>\ncold\n</tool_response>\n<tool_response>\nwarm\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in out
    assert "call_1" not in out


def test_a_llama31_style_template_gets_tools_and_the_parameters_convention(smol_chat):
    t = _with(smol_chat, LLAMA31_STYLE)
    assert t.supports_tools and t.tool_convention == tt.LLAMA3_JSON
    out = t.render(CONVERSATION[:3], tools=[WEATHER])
    assert "Environment: ipython" in out and '"name": "get_weather"' in out
    assert '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>' in out
    assert "<|start_header_id|>ipython<|end_header_id|>\n\ncold<|eot_id|>" in out


def test_smollm2_template_gets_the_hermes_fallback(smol_chat):
    _, t, _ = smol_chat
    assert t.source == "gguf" and not t.supports_tools and t.tool_convention == tt.HERMES
    out = t.render(CONVERSATION, tools=[WEATHER])
    # Our system turn (tools in the Hermes format) replaces SmolLM2's default one.
    assert out.startswith("<|im_start|>system\n# Tools\n") and "SmolLM" not in out
    assert json.dumps(WEATHER) + "\n" + tt.HERMES_INSTRUCTIONS + "<|im_end|>" in out
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
            '<|im_end|>') in out
    assert ("<|im_start|>user\n<tool_response>\ncold\n</tool_response>\n<tool_response>\nwarm\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n") in out
    with_system = t.render([{"role": "system", "content": "Be brief."}, CONVERSATION[0]], tools=[WEATHER])
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    # Without tools or tool turns nothing changes.
    assert t.render(CONVERSATION[:1]) == t.render(CONVERSATION[:1], tools=None)
    assert "SmolLM" in t.render(CONVERSATION[:1])


def test_gemma3_fallback_keeps_its_turns_alternating(gemma_chat):
    _, t = gemma_chat
    assert t.source == "gemma (fallback)" and not t.supports_tools
    out = t.render(CONVERSATION, tools=[WEATHER])   # two tool results merge into one user turn
    assert out.startswith("<start_of_turn>user\n# Tools\n")
    assert out.count("<start_of_turn>user") == 2 and out.count("<start_of_turn>model") == 2
    assert "<tool_response>\ncold\n</tool_response>\n<tool_response>\nwarm\n</tool_response><end_of_turn>" in out


def test_tool_turn_contents_stay_plain_text(smol_chat, smollm2_path):
    """A tool result holding control-token text is a message content: kept as text, not a turn."""
    tok, smol_template, _ = smol_chat
    for t in (smol_template, _with(smol_chat, QWEN_STYLE)):
        for empty in (None, ""):   # an assistant turn that only calls: null content, or "" as the server has it
            calls_turn = {**CONVERSATION[1], "content": empty}
            msgs = [CONVERSATION[0], calls_turn, {"role": "tool", "tool_call_id": "call_1", "content": "<|im_end|>x"}]
            text = t.render(msgs, tools=[WEATHER])
            spans = t.content_spans(msgs, text, tools=[WEATHER])
            assert spans is not None and any(text[a:b] == "<|im_end|>x" for a, b in spans)
            ids = tok.encode(text, add_special=False, parse_special=True, literal=spans)
            im_end = tok.token_to_id("<|im_end|>")
            assert ids.count(im_end) == text.count("<|im_end|>") - 1


def test_call_grammar_holds_smollm2_tokens_to_a_valid_call(smol_chat):
    tok = smol_chat[0]
    tr = parse_chat({"messages": CONVERSATION[:1], "tools": [WEATHER], "tool_choice": "required",
                     "parallel_tool_calls": False}).tools
    state = ec.ConstraintState(ec.Constraint.compile("grammar", call_grammar(tr, ec.JSON_OPTIONS)),
                               ec.build_tokenizer(tok), tok.vocab_size)
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert state.matcher.validate_tokens(tok.encode(good, add_special=False)) == len(tok.encode(good, add_special=False))
    for bad in ('<tool_call>\n{"name": "get_time", "arguments": {}}',          # not an offered function
                '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}',   # city is required
                '{"name": "get_weather", "arguments": {"city": "Oslo"}}'):     # no marker
        ids = tok.encode(bad, add_special=False)
        assert state.matcher.validate_tokens(ids) < len(ids)


@pytest.mark.parametrize("convention", [tt.HERMES, tt.LLAMA3_JSON])
def test_strict_tools_in_auto_leave_text_free_but_hold_calls_to_their_schema(smol_chat, convention):
    from aircupy.server.tools import plan

    tok, t, _ = smol_chat
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    tr = parse_chat({"messages": CONVERSATION[:1], "tools": [strict]}).tools
    template = _with(smol_chat, LLAMA31_STYLE) if convention == tt.LLAMA3_JSON else t
    _, grammar = plan(tr, template, tok, CONVERSATION[:1], special_in_messages=False)
    assert tr.convention == convention and grammar is not None
    constraint = ec.Constraint.compile("grammar", grammar)
    ll = ec.build_tokenizer(tok)

    def takes(text):
        state = ec.ConstraintState(constraint, ll, tok.vocab_size)
        ids = tok.encode(text, add_special=False)
        return state.matcher.validate_tokens(ids) == len(ids)

    key = "parameters" if convention == tt.LLAMA3_JSON else "arguments"
    good = f'{{"name": "get_weather", "{key}": {{"city": "Oslo"}}}}'
    bad = f'{{"name": "get_weather", "{key}": {{"town": "Oslo"}}}}'
    if convention == tt.HERMES:
        good, bad = "Let me see. <tool_call>\n" + good + "\n</tool_call>", "<tool_call>\n" + bad
    assert takes("It is sunny in Oslo today.") and takes(good)
    assert not takes(bad)
    # Without a strict tool, auto is not constrained at all.
    assert plan(parse_chat({"messages": CONVERSATION[:1], "tools": [WEATHER]}).tools, template, tok,
                CONVERSATION[:1], special_in_messages=False)[1] is None
