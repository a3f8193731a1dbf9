"""A model-free stand-in for aircupy.Engine, for the server's concurrency, cancellation and error tests.

It speaks the Engine's API as the server uses it (prompt_ids, tokenize, detokenize, apply_chat_template,
submit, stream, stats, tokenizer, n_ctx) over a byte-level "tokenizer" (id = byte value + 1; 0 is the
end-of-generation id). Like the real engine it batches: one thread steps every running sequence each
`delay` seconds, each generating the text "abcdefghij..." one byte per step; at most max_num_seqs run,
the rest wait in arrival order. It records what ran, in order: ("start", tag) when a sequence enters
the batch, ("end", tag) when it finishes, ("closed", tag) when it is aborted (tag = the prompt's text).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

from aircupy.engine.results import StreamEvent, TokenLogprob
from aircupy.errors import ContextLengthError, TemplateError

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


class FakeTokenizer:
    vocab_size = 257
    eos_id = 0
    bos_id = None

    def token_text(self, i: int) -> str:
        return "" if i == 0 else bytes([i - 1]).decode("latin-1")


class FakeRequest:
    """The handle submit() returns: abort(), done (set once it left the batch), token_ids."""

    def __init__(self, engine, tag: str, params, sink):
        self.engine, self.tag, self.params, self.sink = engine, tag, params, sink
        self.token_ids: list[int] = []
        self.done = threading.Event()

    def abort(self) -> None:
        self.engine._abort(self)


class FakeEngine:
    model_name = "fake"

    def __init__(self, n_ctx: int = 64, delay: float = 0.0, fail_after: int | None = None, max_num_seqs: int = 64):
        self.tokenizer = FakeTokenizer()
        self.n_ctx = n_ctx
        self.delay = delay
        self.fail_after = fail_after      # fail every sequence after this many tokens (a failing forward)
        self.max_num_seqs = max_num_seqs
        self.template_error: str | None = None
        self.log: list[tuple[str, str]] = []
        self.tokenized: list[int] = []         # characters of each text prompt_ids tokenized
        self._cond = threading.Condition()
        self._waiting: deque[FakeRequest] = deque()
        self._running: list[FakeRequest] = []
        self._thread: threading.Thread | None = None

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

    # -- the batching part -------------------------------------------------------------------------
    def submit(self, prompt, params, sink) -> FakeRequest:
        ids = self.prompt_ids(prompt)
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"prompt of {len(ids)} tokens, context {self.n_ctx}")
        req = FakeRequest(self, self.detokenize(ids), params, sink)
        with self._cond:
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fake-runner", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def stream(self, prompt, params):
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt, params, q.put)

        def events():
            try:
                while True:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason is not None:
                        return
            finally:
                req.abort()
        return events()

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def _abort(self, req: FakeRequest) -> None:
        with self._cond:
            if req in self._waiting:
                self._waiting.remove(req)
            elif req in self._running:
                self._running.remove(req)
                self.log.append(("closed", req.tag))
            else:
                return
        req.done.set()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._running:
                    self._cond.wait()
                while self._waiting and len(self._running) < self.max_num_seqs:
                    req = self._waiting.popleft()
                    self._running.append(req)
                    self.log.append(("start", req.tag))
                batch = list(self._running)
            time.sleep(self.delay)          # the forward step
            for req in batch:
                self._step(req)

    def _step(self, req: FakeRequest) -> None:
        p, i = req.params, len(req.token_ids)
        if self.fail_after is not None and i >= self.fail_after:
            if self._leave(req, None):
                req.sink(RuntimeError("simulated engine failure"))
                req.done.set()
            return
        ch = ALPHABET[i % len(ALPHABET)]
        tid = ord(ch) + 1
        lps = None
        if p.logprobs is not None:
            top = tuple((tid + k, chr(tid - 1 + k), -0.5 * (k + 1)) for k in range(p.logprobs))
            lps = (TokenLogprob(tid, ch, -0.5, top),)
        last = i == p.max_tokens - 1
        with self._cond:
            if req not in self._running:        # aborted meanwhile: no event after an abort
                return
            req.token_ids.append(tid)
        if last and not self._leave(req, "end"):
            return
        req.sink(StreamEvent(ch, (tid,), "length" if last else None, lps))
        if last:
            req.done.set()

    def _leave(self, req: FakeRequest, what: str | None) -> bool:
        with self._cond:
            if req not in self._running:
                return False
            self._running.remove(req)
            if what:
                self.log.append((what, req.tag))
        return True
