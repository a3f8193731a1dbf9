"""Function tools on /v1/chat/completions: the request fields, and what they make of a request once the
model's chat template is known.

  tools                 [{"type": "function", "function": {"name", "description"?, "parameters"?,
                        "strict"?}}]: names as OpenAI allows them ([A-Za-z0-9_-], at most 64), unique;
                        parameters a JSON schema of an object (none: no arguments).
  tool_choice           "none" | "auto" (the default with tools) | "required" |
                        {"type": "function", "function": {"name"}}; only with tools.
  parallel_tool_calls   true (the default): "required" and "auto" may make several calls; false: at most
                        one (a later call block is left as content). A named function is called once.
  messages              assistant turns may carry tool_calls (protocol.py reads them with
                        message_tool_calls), and `tool` turns answer them (tool_call_id).

parse() checks shapes only (no llguidance, no model). plan() runs in generation.prepare, with the model:
it compiles every tool's schema (a 400 naming `tools[i].function.parameters` when llguidance cannot),
refuses control-token text in what the template renders outside message contents, picks the template's
convention, and for "required" or a named function builds the Lark grammar that holds generation to that
convention's call syntax, each function's arguments a `%json` sub-grammar of its parameters schema, so
the call always parses and validates. "auto" generates freely and calls are parsed out of the text;
with a `strict` tool, "auto" text is free but a call, once begun, follows its function's schema (an
llguidance lazy trigger on the call marker). "none" parses nothing (the tools still reach a template that
renders them itself).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from aircupy.gguf.tool_template import HERMES
from aircupy.server.apierror import bad, opt_bool, opt_str

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names
MAX_TOOLS = 128
CHOICES = ("none", "auto", "required")
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict    # a JSON schema of an object
    spec: dict          # {"type": "function", "function": {...}} as the template receives it
    strict: bool = False


@dataclass
class ToolRequest:
    """What a request asks of tools. choice: "none" | "auto" | "required" | "function" (then `function`
    names it). convention: how the model writes calls, set by plan() from the chat template."""
    tools: list[Tool]
    choice: str
    function: str | None = None
    parallel: bool = True
    convention: str = HERMES
    names: frozenset = field(default_factory=frozenset)

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1


def parse(body: dict) -> ToolRequest | None:
    """The request's tools, or None without any; a 400 naming the field for a malformed one."""
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if not raw:   # absent, null or [] (vLLM accepts an empty list as "no tools")
        if raw is not None and not isinstance(raw, list):
            raise bad("tools", "expected a list of tools", "invalid_type")
        for key, v in (("tool_choice", choice), ("parallel_tool_calls", parallel)):
            if v is not None:
                raise bad(key, "is only allowed when tools are given")
        return None
    if not isinstance(raw, list):
        raise bad("tools", "expected a list of tools", "invalid_type")
    if len(raw) > MAX_TOOLS:
        raise bad("tools", f"at most {MAX_TOOLS} tools, got {len(raw)}")
    tools: list[Tool] = []
    for i, t in enumerate(raw):
        tool = _tool(t, f"tools[{i}]")
        if any(x.name == tool.name for x in tools):
            raise bad(f"tools[{i}].function.name", f"duplicate function name {tool.name!r}")
        tools.append(tool)
    opt_bool(body, "parallel_tool_calls")
    names = frozenset(t.name for t in tools)
    kind, function = _choice(choice, names)
    return ToolRequest(tools, kind, function, parallel is not False, names=names)


def _tool(t, where: str) -> Tool:
    if not isinstance(t, dict):
        raise bad(where, "expected a tool object", "invalid_type")
    if t.get("type") != "function":
        raise bad(f"{where}.type", f"tool type {t.get('type')!r} is not supported (only \"function\")")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise bad(f"{where}.function", "is required (an object with a name)", "missing_required_parameter")
    name = fn.get("name")
    if name is None:
        raise bad(f"{where}.function.name", "is required", "missing_required_parameter")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise bad(f"{where}.function.name", f"{name!r} is not a valid function name (letters, digits, _ and -, "
                                            "at most 64)")
    desc = opt_str(fn, "description", f"{where}.function.description")
    strict = opt_bool(fn, "strict", f"{where}.function.strict")
    params = fn.get("parameters")
    if params is None:
        params = NO_PARAMETERS
    elif not isinstance(params, dict):
        raise bad(f"{where}.function.parameters", "must be a JSON schema object", "invalid_type")
    elif params.get("type", "object") != "object":
        raise bad(f"{where}.function.parameters", f"must describe an object (type \"object\"), got type "
                                                  f"{params.get('type')!r}")
    else:
        params = {"type": "object", **params}
    spec_fn = {"name": name, **({"description": desc} if desc is not None else {}),
               "parameters": params, **({"strict": strict} if strict is not None else {})}
    return Tool(name, params, {"type": "function", "function": spec_fn}, strict is True)


def _choice(choice, names: frozenset) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise bad("tool_choice", f"unknown value {choice!r} (none, auto, required or "
                                     '{"type": "function", "function": {"name": ...}})')
        return choice, None
    if not isinstance(choice, dict):
        raise bad("tool_choice", "expected a string or a function object", "invalid_type")
    if choice.get("type") != "function":
        raise bad("tool_choice.type", f"expected \"function\", got {choice.get('type')!r}")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad("tool_choice.function.name", "is required", "missing_required_parameter")
    if name not in names:
        raise bad("tool_choice.function.name", f"no tool named {name!r} among the tools given")
    return "function", name


def message_tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls, checked: [{"id", "type": "function", "function": {"name",
    "arguments": JSON text of an object}}] (arguments sent as an object are accepted and kept as text)."""
    if not isinstance(calls, list):
        raise bad(where, "expected a list of tool calls", "invalid_type")
    out = []
    for j, c in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            raise bad(at, "expected {id, type: function, function: {name, arguments}}", "invalid_type")
        if c.get("type", "function") != "function":
            raise bad(f"{at}.type", "only function tool calls are supported")
        fn = c["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{at}.function.name", "is required", "missing_required_parameter")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                decoded = json.loads(args)
            except (ValueError, RecursionError):
                decoded = None
            if not isinstance(decoded, dict):
                raise bad(f"{at}.function.arguments", "must be JSON text of an object")
        elif isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        else:
            raise bad(f"{at}.function.arguments", "expected a string of JSON", "invalid_type")
        cid = c.get("id")
        if cid is not None and not isinstance(cid, str):
            raise bad(f"{at}.id", "expected a string", "invalid_type")
        out.append({"id": cid or f"call_{j}", "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


# ---- with the model (generation.prepare) -------------------------------------------------------------

def plan(tr: ToolRequest, template, tokenizer, messages: list[dict], special_in_messages: bool):
    """(the tools to render, the Lark grammar or None) for `tr` on this model; sets tr.convention."""
    # llguidance, imported when first needed
    from aircupy.engine.constraint import JSON_OPTIONS, Constraint
    from aircupy.errors import InvalidParameterError

    for i, t in enumerate(tr.tools):
        try:
            Constraint.compile("json_schema", t.parameters)
        except InvalidParameterError as e:
            raise bad(f"tools[{i}].function.parameters", str(e).split(": ", 1)[-1]) from None
    if not special_in_messages:
        _refuse_control_text(tr, tokenizer, messages)
    tr.convention = template.tool_convention
    # A template without tool support gets the Hermes tool list in its system message, except with
    # "none": no tools offered, no call asked for.
    render = [t.spec for t in tr.tools] if (template.supports_tools or tr.choice != "none") else None
    if tr.constrained:
        grammar = call_grammar(tr, JSON_OPTIONS)
    elif tr.choice == "auto" and any(t.strict for t in tr.tools):
        grammar = strict_auto_grammar(tr, JSON_OPTIONS)
    else:
        grammar = None
    return render, grammar


def _refuse_control_text(tr: ToolRequest, tokenizer, messages: list[dict]) -> None:
    """Tool specs and call arguments are rendered outside message contents, where special-token text
    is parsed as control tokens: refuse it there, as a message could not forge a turn either."""
    for i, t in enumerate(tr.tools):
        if tokenizer.has_control_text(json.dumps(t.spec, ensure_ascii=False)):
            raise bad(f"tools[{i}]", "holds special-token text of this model's vocabulary")
    for i, m in enumerate(messages):
        for j, c in enumerate(m.get("tool_calls") or ()):
            if tokenizer.has_control_text(json.dumps(c, ensure_ascii=False)):
                raise bad(f"messages[{i}].tool_calls[{j}]", "holds special-token text of this model's vocabulary")
        for key in ("tool_call_id", "name"):   # a tool turn's fields some templates print
            if isinstance(m.get(key), str) and tokenizer.has_control_text(m[key]):
                raise bad(f"messages[{i}].{key}", "holds special-token text of this model's vocabulary")


def call_grammar(tr: ToolRequest, json_options: dict) -> str:
    """The Lark grammar of the calls `tr` requires in its convention: one call of the named function,
    or for "required" one call of any (one or more with parallel_tool_calls); each function's rule
    writes its name and its arguments as a %json sub-grammar of its parameters schema."""
    from aircupy.gguf.tool_template import LLAMA3_JSON
    tools = [t for t in tr.tools if tr.function in (None, t.name)]
    key = "parameters" if tr.convention == LLAMA3_JSON else "arguments"
    rules = []
    for i, t in enumerate(tools):
        schema = {**t.parameters, "x-guidance": json_options}
        head = json.dumps(f'{{"name": {json.dumps(t.name)}, "{key}": ')
        rules.append(f"fn_{i}: {head} %json {json.dumps(schema)} \"}}\"")
    if tr.convention == LLAMA3_JSON:
        call, sep = "fn", json.dumps("; ")
    else:
        call, sep = f"{json.dumps('<tool_call>' + chr(10))} fn {json.dumps(chr(10) + '</tool_call>')}", json.dumps("\n")
    start = "start: call" + (f" ({sep} call)*" if tr.choice == "required" and tr.parallel else "")
    return "\n".join([start, f"call: {call}", "fn: " + " | ".join(f"fn_{i}" for i in range(len(tools))), *rules])


def strict_auto_grammar(tr: ToolRequest, json_options: dict) -> str:
    """"auto" with strict tools: any text, but a call follows the syntax and schema of an offered
    function. HERMES: free text in which each `<tool_call>` (a lazy trigger: it ends the free text where
    it appears) must go on as a whole call. LLAMA3_JSON: an answer that opens with "{" is calls, any
    other is text."""
    from llguidance import StructTag

    from aircupy.gguf.tool_template import LLAMA3_JSON
    if tr.convention == LLAMA3_JSON:
        calls = call_grammar(ToolRequest(tr.tools, "required", None, tr.parallel, tr.convention), json_options)
        return "start: answer\nanswer: \"\" | TEXT | calls\nTEXT: /[^{](.|\\n)*/\n" + calls.replace("start:", "calls:", 1)
    tags = [StructTag(trigger="<tool_call>", begin=f'<tool_call>\n{{"name": {json.dumps(t.name)}, "arguments": ',
                      grammar={**t.parameters, "x-guidance": json_options}, end="}\n</tool_call>")
            for t in tr.tools]
    return StructTag.to_grammar(tags, assume_special=False)
