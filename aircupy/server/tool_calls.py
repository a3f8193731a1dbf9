"""Tool calls parsed out of generated text, whole or as it streams, in both conventions
(gguf/tool_template.py): one state machine per choice, fed text as it is generated, so that a streamed
answer and a whole one are cut the same way.

  HERMES       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the text;
               text outside them is content. A block whose JSON does not parse, is not an object with a
               string "name" and an object "arguments", or names a function the request did not offer,
               stays content, markers and all. A block left open at the end of the text is a call when
               what follows the marker is a whole call object (models often end on EOS there).
  LLAMA3_JSON  the whole answer is one call object `{"name": ..., "parameters": {...}}` (or several
               separated by ";"), optionally after `<|python_tag|>`; anything else is all content.

Content beside calls: the whitespace that separates text from a call (before or after it) is dropped,
and content that is nothing else becomes None. An answer without calls is content exactly as generated.
While streaming, text that may be the start of a call marker is held back until it is decided, and so
is whitespace that may turn out to precede a call.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from aircupy.gguf.tool_template import HERMES, LLAMA3_JSON, PYTHON_TAG

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; arguments is JSON text of an object (as OpenAI sends it)."""
    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _as_call(obj, names, keys=("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from a decoded call object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = next((obj[k] for k in keys if k in obj), None)
    if isinstance(args, str):   # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class ToolCallStream:
    """Feed generated text with feed(); finish() at the end. Both return events: ("content", text) or
    ("call", ToolCall). names: the functions a call may name (None: any); max_calls: calls to take at
    most (1 when parallel_tool_calls is false; later blocks are content)."""

    def __init__(self, convention: str, names=None, max_calls: int | None = None):
        if convention not in (HERMES, LLAMA3_JSON):
            raise ValueError(f"unknown tool-call convention {convention!r}")
        self.convention, self.names, self.max_calls = convention, names, max_calls
        self.n_calls = 0
        self._buf = ""          # text not yet decided
        self._held = ""         # whitespace after content, dropped if a call follows
        self._in_call = False   # HERMES: inside <tool_call>
        self._after_call = False
        self._mode = None       # LLAMA3_JSON: None (undecided), "json" or "text"

    def _calls_allowed(self) -> bool:
        return self.max_calls is None or self.n_calls < self.max_calls

    def feed(self, text: str) -> list[tuple]:
        out: list[tuple] = []
        if self.convention == HERMES:
            self._buf += text
            self._hermes(out)
        else:
            self._llama(text, out)
        return out

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        if self.convention == HERMES:
            if self._in_call:
                call = self._hermes_call(self._buf)
                if call is None:
                    self._content(OPEN + self._buf, out)
                else:
                    self._emit_call(call, out)
            else:
                self._content(self._buf, out)
        elif self._mode == "text":
            self._content(self._buf, out)
        else:
            calls = self._llama_calls(self._buf)
            if calls is None:
                self._content(self._buf, out)
            else:
                for call in calls:
                    self._emit_call(call, out)
        self._buf = ""
        if self._held:
            out.append(("content", self._held))
            self._held = ""
        return out

    # ---- content and calls -------------------------------------------------------------------
    def _content(self, piece: str, out: list, hold: bool = True) -> None:
        """Emit content, holding back its trailing whitespace (dropped if a call comes next)."""
        if self._after_call:
            piece = piece.lstrip()
            if not piece:
                return
            self._after_call = False
        text = self._held + piece
        core = text.rstrip() if hold else text
        self._held = text[len(core):]
        if core:
            out.append(("content", core))

    def _emit_call(self, call: ToolCall, out: list) -> None:
        self._held = ""
        self._after_call = True
        self.n_calls += 1
        out.append(("call", call))

    # ---- HERMES ------------------------------------------------------------------------------
    def _hermes(self, out: list) -> None:
        while True:
            if not self._in_call:
                k = self._buf.find(OPEN) if self._calls_allowed() else -1
                if k >= 0:
                    self._content(self._buf[:k], out)
                    self._buf, self._in_call = self._buf[k + len(OPEN):], True
                    continue
                keep = _partial_suffix(self._buf, OPEN) if self._calls_allowed() else 0
                self._content(self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return
            k = self._buf.find(CLOSE)
            if k < 0:
                return
            body, self._buf, self._in_call = self._buf[:k], self._buf[k + len(CLOSE):], False
            call = self._hermes_call(body)
            if call is None:
                self._content(OPEN + body + CLOSE, out)
            else:
                self._emit_call(call, out)

    def _hermes_call(self, body: str) -> ToolCall | None:
        return _as_call(_loads(body.strip()), self.names)

    # ---- LLAMA3_JSON -------------------------------------------------------------------------
    def _llama(self, text: str, out: list) -> None:
        if self._mode == "text":
            self._content(text, out, hold=False)
            return
        self._buf += text
        if self._mode == "json":
            return
        head = self._buf.lstrip()
        if not head or PYTHON_TAG.startswith(head):
            return   # undecided: blanks, or the start of the tag
        if head.startswith(("{", PYTHON_TAG)):
            self._mode = "json"
        else:
            self._mode = "text"
            self._content(self._buf, out, hold=False)
            self._buf = ""

    def _llama_calls(self, text: str) -> list[ToolCall] | None:
        """Every call of a whole JSON answer, or None when it is not entirely calls."""
        s = text.strip()
        if s.startswith(PYTHON_TAG):
            s = s[len(PYTHON_TAG):].lstrip()
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(s):
            try:
                obj, pos = decoder.raw_decode(s, pos)
            except (ValueError, RecursionError):
                return None
            call = _as_call(obj, self.names, keys=("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            rest = s[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            pos = len(s) - len(rest)
        if not calls or (self.max_calls is not None and len(calls) > self.max_calls):
            return None
        return calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (0 if none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def parse(text: str, convention: str, names=None, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer: without calls the content is `text` unchanged; with calls it
    is the text outside them (None when there is none)."""
    stream = ToolCallStream(convention, names, max_calls)
    events = stream.feed(text) + stream.finish()
    calls = [e[1] for e in events if e[0] == "call"]
    if not calls:
        return text, []
    content = "".join(e[1] for e in events if e[0] == "content")
    return (content or None), calls
