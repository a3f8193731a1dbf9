"""Tools in chat templates: which tool-call convention a template speaks, and how a conversation with
tools, assistant tool calls and tool results is handed to a template that knows nothing of them.

Conventions (what the model writes when it calls a function):
  HERMES       Hermes / Qwen 2.5+: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
               block per call; tool results come back as `<tool_response>` blocks in a user turn.
  LLAMA3_JSON  Llama 3.1 / 3.2 JSON tool calling: the whole answer is `{"name": ..., "parameters": {...}}`,
               optionally after `<|python_tag|>`; results come back in an `ipython` (or `tool`) turn.

A template supports tools when it reads the `tools` variable (jinja2's own analysis of its source, not a
guess from names); its convention is LLAMA3_JSON when its text carries Llama 3.1's markers
(`<|python_tag|>`, or an `ipython` role with `"parameters"`), else HERMES (Qwen's, Hermes' and most
others' templates write `<tool_call>`). Such a template receives `tools` and the messages as
transformers gives them (tool-call arguments as objects, not JSON text: Qwen's and Llama's templates
apply `tojson` to them).

A template that does not read `tools` (SmolLM2's, the ChatML and Gemma fallbacks) gets the Hermes
fallback instead: the tool list goes into the system message in the Hermes format, an assistant turn's
tool calls become `<tool_call>` blocks appended to its text, and each run of tool results becomes one
user turn of `<tool_response>` blocks (one turn, so templates that insist on alternating roles still
render). Only string contents reach the template.
"""
from __future__ import annotations

import json

HERMES = "hermes"
LLAMA3_JSON = "llama3_json"
PYTHON_TAG = "<|python_tag|>"

HERMES_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_INSTRUCTIONS = ("</tools>\n\nFor each function call, return a json object with function name and "
                       "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                       '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def convention_of(text: str) -> str:
    """The call convention a template's source speaks (HERMES unless it carries Llama 3.1's markers)."""
    llama = PYTHON_TAG in text or ("ipython" in text and '"parameters"' in text)
    return LLAMA3_JSON if llama and "<tool_call>" not in text else HERMES


def has_tool_turns(messages: list[dict]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def for_template(messages: list[dict], tools, supports_tools: bool) -> tuple[list[dict], list | None]:
    """(messages, tools) as the template receives them: unchanged without tools or tool turns; with
    arguments as objects for a template that supports tools; the Hermes fallback otherwise."""
    if not tools and not has_tool_turns(messages):
        return messages, tools
    if supports_tools:
        return [_with_object_arguments(m) for m in messages], tools
    return hermes_fallback(messages, tools), None


def _with_object_arguments(m: dict) -> dict:
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = fn["arguments"]   # left as text: the template decides what to do with it
            call = {**call, "function": {**fn, "arguments": args}}
        out.append(call)
    return {**m, "tool_calls": out}


def hermes_system_block(tools) -> str:
    """The Hermes tool list: one `{"type": "function", "function": {...}}` JSON line per tool."""
    lines = [json.dumps(t, ensure_ascii=False) for t in tools]
    return "\n".join([HERMES_PREAMBLE, *lines, HERMES_INSTRUCTIONS])


def hermes_call_text(name: str, arguments) -> str:
    """One call as the Hermes convention writes it (arguments: an object, or JSON text of one)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n</tool_call>'


def hermes_fallback(messages: list[dict], tools) -> list[dict]:
    """Messages for a template without tool support: tools in the system message, calls and results as
    Hermes blocks in plain string contents (see the module docstring)."""
    out: list[dict] = []
    if tools:
        block = hermes_system_block(tools)
        if messages and messages[0].get("role") == "system":
            first = messages[0]
            text = first.get("content") or ""
            out.append({"role": "system", "content": f"{text}\n\n{block}" if text else block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        role = m.get("role")
        if role == "tool":
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        elif role == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            for call in m["tool_calls"]:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                parts.append(hermes_call_text(str(fn.get("name", "")), fn.get("arguments", {})))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
                       | {"content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    return out
