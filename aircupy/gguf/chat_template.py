"""Chat templates: `tokenizer.chat_template` rendered with jinja2 the way transformers renders it.

Same environment as transformers' `_compile_jinja_template`: ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and loop controls; `tojson` without ASCII escaping (indent, separators,
sort_keys accepted); `raise_exception(msg)`; `strftime_now(fmt)`; `{% generation %}` blocks; variables
messages, add_generation_prompt, tools, documents and the special-token texts (bos_token, eos_token...).

A GGUF file is untrusted, and so is its template (CVE-2024-34359 was a template in a GGUF reaching
`os.popen` through `__subclasses__`). On top of jinja2's sandbox, which refuses `_`-prefixed attributes
and mutation of lists and dicts, this environment
  * raises at the first unsafe attribute instead of rendering it as an empty string (so an attack fails
    loudly rather than half-working),
  * bounds the memory, the work and the output of every render (template_sandbox.BudgetSandbox), so a
    template cannot exhaust memory or spin forever,
  * turns every failure into aircupy's TemplateError, and a sandbox or budget violation into its
    UnsafeTemplateError, which `check()` (run when a model is loaded) turns into a refusal of the file.

content_spans() also says where each message's content lies in the prompt, so the tokenizer can keep
special-token text typed by a user as plain text (a user cannot forge "<|im_start|>system").

Without a template in the file: Gemma's turn format for gemma models (gemma-3-270m base has none), else
ChatML. render() leaves out a leading BOS when the tokenizer adds one itself, so that
`tokenizer.encode(render(...))` starts with exactly one BOS.
"""
from __future__ import annotations

import json
import re
import secrets
from datetime import datetime

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import SecurityError

from aircupy.errors import AircupyError, InvalidParameterError, TemplateError, UnsafeTemplateError
from aircupy.gguf import tool_template
from aircupy.gguf.template_sandbox import Budget, BudgetSandbox

# Conversations a template is tried on when a model loads: a hostile template is refused at start-up.
PROBES = ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi!"},
           {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Thanks."}],
          [{"role": "user", "content": "Hi!"}])

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma 3's own template, text only: system text folded into the first user turn, assistant -> "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


class _GenerationBlock(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text): render the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Sandbox(BudgetSandbox):
    def unsafe_undefined(self, obj, attribute):
        # jinja2 would return an Undefined that prints as "" -- fail at the attempt instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.wrap_filters()
    return env


def normalize_messages(messages) -> list[dict]:
    """Validate OpenAI-style messages; content given as a list of {"type": "text", "text": ...} parts
    is flattened to one string (parts joined by newlines, as vLLM does), since most templates
    concatenate `message['content']` as a string."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidParameterError("messages", "must be a list of {role, content} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise InvalidParameterError("messages", f"message {i} must be an object with a string 'role'")
        content = msg.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidParameterError("messages", f"message {i}: content part {kind!r} is not supported "
                                                            "(only text)")
            msg = {**msg, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise InvalidParameterError("messages", f"message {i}: content must be a string or a list of parts")
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template. `source` says where it came from: "gguf", "chatml (fallback)" or
    "gemma (fallback)"; `text` is the template itself. `supports_tools`: the template reads `tools`
    (else tools and tool turns are rendered through the Hermes fallback, gguf/tool_template.py);
    `tool_convention`: how the model writes a call (tool_template.HERMES or LLAMA3_JSON)."""

    def __init__(self, text: str, source: str, special_tokens: dict[str, str], strip_bos: bool):
        self.text = text
        self.source = source
        self._special = special_tokens
        self._strip_bos = strip_bos
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template ({source}) does not parse: {e.message} (line {e.lineno})") from e
        variables = meta.find_undeclared_variables(self._template.environment.parse(text))
        self.supports_tools = "tools" in variables
        self.tool_convention = tool_template.convention_of(text) if self.supports_tools else tool_template.HERMES

    @classmethod
    def from_gguf(cls, g, tokenizer) -> "ChatTemplate":
        return cls.from_metadata(g.metadata, tokenizer)

    @classmethod
    def from_metadata(cls, md: dict, tokenizer) -> "ChatTemplate":
        special = {}
        for name, tid in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
            if tid is not None:
                special[name] = tokenizer.token_text(tid)
        for name, text in (("unk_token", "<unk>"), ("pad_token", "<pad>")):
            if tokenizer.token_to_id(text) is not None:
                special[name] = text
        text = md.get("tokenizer.chat_template")
        if isinstance(text, str) and text.strip():
            source = "gguf"
        elif str(md.get("general.architecture", "")).startswith("gemma") or \
                tokenizer.token_to_id("<start_of_turn>") is not None:
            text, source = GEMMA_TEMPLATE, "gemma (fallback)"
        else:
            text, source = CHATML_TEMPLATE, "chatml (fallback)"
        return cls(text, source, special, strip_bos=tokenizer.add_bos and "bos_token" in special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
               documents=None, **extra) -> str:
        """The prompt text for `messages`; encode it with parse_special=True (and add_special=True).
        tools: OpenAI function tools ([{"type": "function", "function": {...}}]); messages may carry
        assistant `tool_calls` and `tool` turns (see supports_tools)."""
        msgs, tools = tool_template.for_template(normalize_messages(messages), tools, self.supports_tools)
        context = {**self._special, **extra, "messages": msgs, "add_generation_prompt": bool(add_generation_prompt),
                   "tools": tools, "documents": documents}
        env = self._template.environment
        try:
            # The budget grows with the input: the messages, tools, documents and extra values.
            budget = Budget.for_input(_text_size([msgs, tools, documents, extra]), len(msgs))
            parts = []
            with env.budgeted(budget):
                for part in self._template.generate(**context):
                    budget.emit(len(part))
                    parts.append(part)
            out = "".join(parts)
        except AircupyError:
            raise
        except (SecurityError, RecursionError, MemoryError) as e:
            raise UnsafeTemplateError(f"chat template ({self.source}) refused by the sandbox: "
                                      f"{type(e).__name__}: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template ({self.source}) failed: {e}") from e
        except Exception as e:  # anything an untrusted template provokes is the template's fault
            raise TemplateError(f"chat template ({self.source}) failed: {type(e).__name__}: {e}") from e
        bos = self._special.get("bos_token")
        if self._strip_bos and bos and out.startswith(bos):
            out = out[len(bos):]
        return out

    def content_spans(self, messages: list[dict], text: str, add_generation_prompt: bool = True, tools=None):
        """The (start, end) character spans of `text` (this template's rendering of `messages`) that are
        message contents, for Tokenizer.encode(literal=spans); None when the template changes the
        contents in a way that hides where they are (then only contents free of special-token text may
        be tokenized as they stand).

        The template is rendered again with each content's non-blank core wrapped in markers no
        client can guess (a fresh random nonce); with the markers removed it must give `text` again
        (a template that trims contents still does: their blanks sit outside the markers)."""
        nonce = secrets.token_hex(8)
        opening, closing = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        marked = [{**m, "content": _wrap(m["content"], opening, closing)} if isinstance(m.get("content"), str)
                  else m for m in normalize_messages(messages)]
        unmarked = _unwrap(self.render(marked, add_generation_prompt, tools=tools), opening, closing)
        if unmarked is None or unmarked[0] != text:
            return None
        return unmarked[1]

    def check(self) -> None:
        """Render the probe conversations: UnsafeTemplateError when the sandbox or the budget refuses
        the template (hostile or broken for every conversation); the template's own refusals of a
        conversation (raise_exception) are left to the requests that meet them."""
        for probe in PROBES:
            try:
                self.render(probe)
            except UnsafeTemplateError as e:
                raise UnsafeTemplateError(f"the model's chat template is refused: {e}") from None
            except TemplateError:
                continue


def _text_size(v) -> int:
    """Characters of text in a JSON-like value (what a render's budget is proportional to)."""
    if isinstance(v, str):
        return len(v)
    if isinstance(v, dict):
        return sum(_text_size(k) + _text_size(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return sum(_text_size(x) for x in v)
    return 8


def _wrap(content: str, opening: str, closing: str) -> str:
    core = content.strip()
    if not core:
        # Nothing to locate, and markers would make a blank content truthy: a template's
        # `{% if message.content %}` (an assistant turn that only calls tools) would then render differently.
        return content
    head = content[:len(content) - len(content.lstrip())]
    tail = content[len(content.rstrip()):]
    return head + opening + core + closing + tail


def _unwrap(marked: str, opening: str, closing: str):
    """(text without the markers, [(start, end) of each marked span]) or None if they do not pair up."""
    out, spans, pos, start, at = [], [], 0, None, 0
    for m in re.finditer(re.escape(opening) + "|" + re.escape(closing), marked):
        out.append(marked[pos:m.start()])
        at += m.start() - pos
        pos = m.end()
        if m.group() == opening:
            if start is not None:
                return None
            start = at
        else:
            if start is None:
                return None
            if at > start:
                spans.append((start, at))
            start = None
    if start is not None:
        return None
    out.append(marked[pos:])
    return "".join(out), spans
