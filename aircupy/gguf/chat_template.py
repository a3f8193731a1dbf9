"""Chat templates: `tokenizer.chat_template` rendered with jinja2 the way transformers renders it.

Same environment as transformers' `_compile_jinja_template`: ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and loop controls; `tojson` without ASCII escaping (indent, separators,
sort_keys accepted); `raise_exception(msg)`; `strftime_now(fmt)`; `{% generation %}` blocks; variables
messages, add_generation_prompt, tools, documents and the special-token texts (bos_token, eos_token...).

A GGUF file is untrusted, and so is its template (CVE-2024-34359 was a template in a GGUF reaching
`os.popen` through `__subclasses__`). On top of jinja2's sandbox, which refuses `_`-prefixed attributes
and mutation of lists and dicts, this environment
  * raises at the first unsafe attribute instead of rendering it as an empty string (so an attack fails
    loudly with TemplateError rather than half-working),
  * caps string/list repetition (`'a' * 10**10`), exponents, and the total items `range` may yield in one
    render, so a template cannot exhaust memory or spin forever,
  * turns every failure into aircupy's TemplateError.

Without a template in the file: Gemma's turn format for gemma models (gemma-3-270m base has none), else
ChatML. render() leaves out a leading BOS when the tokenizer adds one itself, so that
`tokenizer.encode(render(...))` starts with exactly one BOS.
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from aircupy.errors import AircupyError, InvalidParameterError, TemplateError

_MAX_REPEAT = 1 << 20        # longest string/list `*` may build (items)
_MAX_RANGE_ITEMS = 1 << 20   # total items all `range` calls may yield in one render

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


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj, attribute):
        # jinja2 would return an Undefined that prints as "" -- fail at the attempt instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError(f"repetition to {len(seq) * n} items exceeds {_MAX_REPEAT}")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise SecurityError(f"exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


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
    return env


def _budgeted_range():
    """A `range` for one render: jinja2's sandbox caps each range at 100k items, but nested loops
    multiply; this caps their total."""
    left = [_MAX_RANGE_ITEMS]

    def rng(*args):
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise SecurityError(f"template iterated more than {_MAX_RANGE_ITEMS} range items")
        return r
    return rng


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
    "gemma (fallback)"; `text` is the template itself."""

    def __init__(self, text: str, source: str, special_tokens: dict[str, str], strip_bos: bool):
        self.text = text
        self.source = source
        self._special = special_tokens
        self._strip_bos = strip_bos
        try:
            self._template = _environment().from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template ({source}) does not parse: {e.message} (line {e.lineno})") from e

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
        """The prompt text for `messages`; encode it with parse_special=True (and add_special=True)."""
        msgs = normalize_messages(messages)
        context = {**self._special, **extra, "messages": msgs, "add_generation_prompt": bool(add_generation_prompt),
                   "tools": tools, "documents": documents, "range": _budgeted_range()}
        try:
            out = self._template.render(**context)
        except AircupyError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template ({self.source}) failed: {e}") from e
        except Exception as e:  # anything an untrusted template provokes is the template's fault
            raise TemplateError(f"chat template ({self.source}) failed: {type(e).__name__}: {e}") from e
        bos = self._special.get("bos_token")
        if self._strip_bos and bos and out.startswith(bos):
            out = out[len(bos):]
        return out
