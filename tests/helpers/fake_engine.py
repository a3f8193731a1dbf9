"""A model-free stand-in for aircupy.Engine, for the server's queue, cancellation and error tests.

It speaks the Engine's API (prompt_ids, tokenize, detokenize, apply_chat_template, stream, tokenizer,
n_ctx) over a byte-level "tokenizer" (id = byte value + 1; 0 is the end-of-generation id) and generates
the text "abcdefghij..." one byte per step, `delay` seconds per step, so tests can hold a request
mid-stream. It records what ran, in order, and when each stream was closed.
"""
from __future__ import annotations

import threading
import time

from aircupy.engine.results import StreamEvent, TokenLogprob
from aircupy.errors import ContextLengthError, TemplateError

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class FakeTokenizer:
    vocab_size = 257
    eos_id = 0
    bos_id = None

    def token_text(self, i: int) -> str:
        return "" if i == 0 else bytes([i - 1]).decode("latin-1")


class FakeEngine:
    model_name = "fake"

    def __init__(self, n_ctx: int = 64, delay: float = 0.0, fail_after: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.n_ctx = n_ctx
        self.delay = delay
        self.fail_after = fail_after      # raise RuntimeError after this many tokens (mid-stream failure)
        self.template_error: str | None = None
        self.log: list[tuple[str, str]] = []   # (event, tag): "start"/"end"/"closed", tag = prompt text
        self.tokenized: list[int] = []         # characters of each text prompt_ids tokenized
        self._lock = threading.Lock()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return [b + 1 for b in text.encode()]

    def detokenize(self, ids) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.template_error:
            raise TemplateError(self.template_error)
        return "".join(f"{m['role']}:{m['content']}\n" for m in messages) + "assistant:"

    def prompt_ids(self, prompt, *, max_len: int | None = None, special_in_messages: bool = False) -> list[int]:
        if isinstance(prompt, str):
            text = prompt
        elif prompt and isinstance(prompt[0], dict):
            text = self.apply_chat_template(prompt)
        else:
            return list(prompt)
        if max_len is not None and len(text.encode()) > max_len:   # one token per byte: the bound is exact
            raise ContextLengthError(f"the prompt has at least {len(text.encode())} tokens")
        self.tokenized.append(len(text))
        return self.tokenize(text)

    def stream(self, prompt, params):
        ids = self.prompt_ids(prompt)
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"prompt of {len(ids)} tokens, context {self.n_ctx}")
        return self._gen(self.detokenize(ids), params)

    def _gen(self, tag, params):
        with self._lock:  # one sequence at a time, like the real Engine
            self.log.append(("start", tag))
            try:
                for i in range(params.max_tokens):
                    if self.fail_after is not None and i >= self.fail_after:
                        raise RuntimeError("simulated engine failure")
                    time.sleep(self.delay)
                    ch = ALPHABET[i % len(ALPHABET)]
                    tid = ord(ch) + 1
                    lps = None
                    if params.logprobs is not None:
                        top = tuple((tid + k, chr(tid - 1 + k), -0.5 * (k + 1)) for k in range(params.logprobs))
                        lps = (TokenLogprob(tid, ch, -0.5, top),)
                    last = i == params.max_tokens - 1
                    yield StreamEvent(ch, (tid,), "length" if last else None, lps)
                self.log.append(("end", tag))
            finally:
                if not self.log or self.log[-1] != ("end", tag):
                    self.log.append(("closed", tag))
