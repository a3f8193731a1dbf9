"""Between a validated request and the engine: prepare() tokenizes and checks it, Generation runs it.

prepare() runs off the event loop (it renders the chat template and tokenizes) and raises every error a
client can cause before any response is sent, so those come back as a 400 and never as a broken stream.
Generation submits every choice (prompt by prompt, n per prompt) to the engine at once, as parallel
sequences batched with every other request's (the n choices of one prompt share its KV blocks through
the prefix cache), and hands their events from the engine's runner thread to a channel: Delta events,
then Done and END (or Failed, then END). For the HTTP server the channel is AsyncEvents (an
asyncio.Queue fed with loop.call_soon_threadsafe, read by the request's coroutine); run() is the same
generation read synchronously on a thread (the batch runner, server/batch.py). cancel() aborts every
choice at once (the client left): their blocks are freed before the engine's next step.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from aircupy.errors import ContextLengthError, InvalidParameterError, TemplateError
from aircupy.server import responses as R
from aircupy.server import tool_calls, tools
from aircupy.server.limits import Limits
from aircupy.server.protocol import DEFAULT_LIMITS, APIError, GenerationRequest, bad, check_token_ids
from aircupy.server.responses import finish_reason

# OpenAI's defaults (temperature 1, no top-k/top-p/min-p cut, no penalties): the server states every
# sampling field, so aircupy's CLI-oriented SamplingParams defaults (llama.cpp's) never leak into the API.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0}

# SamplingParams' constraint fields; an error in one is reported under the request field it came from.
CONSTRAINT_FIELDS = frozenset({"grammar", "json_schema", "regex", "choice", "json_object"})


@dataclass
class Plan:
    """A request ready to run: prompt_ids[p] and params[p][c] for choice index p * n + c."""
    prompt_ids: list[list[int]]
    params: list[list[Any]]     # SamplingParams
    param: str = "prompt"       # the request field the prompt came from, for errors

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


@dataclass(frozen=True)
class Delta:
    """One engine step of choice `index`: new text, how many tokens it took, their logprobs, and the
    OpenAI finish_reason on the choice's last step (None before)."""
    index: int
    text: str
    n_tokens: int
    logprobs: tuple | None
    finish: str | None


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int
    seconds: float          # from submission to the last choice's last token (the engine's time for it)


class Answer:
    """A non-streamed answer folded from a job's Delta and Done events: the body JobResponse sends, and
    the one the batch runner writes (server/batch.py), built in this one place."""

    def __init__(self):
        self.choices: dict[int, R.ChoiceResult] = {}
        self.usage = (0, 0)     # (prompt_tokens, completion_tokens) from Done

    def add(self, ev) -> None:
        if isinstance(ev, Delta):
            c = self.choices.setdefault(ev.index, R.ChoiceResult(ev.index, "", None))
            c.text += ev.text
            c.logprobs.extend(ev.logprobs or ())
            c.finish_reason = ev.finish or c.finish_reason
        elif isinstance(ev, Done):
            self.usage = (ev.prompt_tokens, ev.completion_tokens)

    def finished(self, n_choices: int) -> bool:
        """Every choice ran to its end (a cancelled job leaves one without a finish_reason)."""
        return len(self.choices) == n_choices and all(c.finish_reason for c in self.choices.values())

    def body(self, req: GenerationRequest, rid: str, created: int, model: str) -> dict:
        tr = req.tools
        if tr is not None and tr.parses_calls:   # chat with tools: calls out of each choice's text
            for c in self.choices.values():
                content, calls = tool_calls.parse(c.text, tr.convention, tr.names, tr.max_calls)
                if calls:
                    c.text, c.tool_calls, c.finish_reason = content, [t.to_dict() for t in calls], "tool_calls"
        return R.completion_response(req.kind, rid, created, model, list(self.choices.values()), *self.usage,
                                     with_logprobs=req.logprobs is not None)


def _context_error(n_prompt: int, n_ctx: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
                         f"{n_prompt} tokens (at least one must be left to generate).",
                    param=param, code="context_length_exceeded")


def prepare(engine, req: GenerationRequest, limits: Limits = DEFAULT_LIMITS, special_in_messages: bool = False,
            cancel=None) -> Plan | None:
    """Tokenize every prompt and build each choice's SamplingParams; raises APIError / AircupyError.
    Runs on a thread; `cancel` (a threading.Event) set means the client left: stop, return None."""
    from aircupy.engine.params import SamplingParams  # the engine package, imported when first needed

    vocab = engine.tokenizer.vocab_size
    n_ctx = engine.n_ctx
    param = "messages" if req.kind == "chat" else "prompt"
    cap = limits.max_tokens_for(n_ctx)
    if req.sampling.get("max_tokens", 0) > cap:
        raise bad("max_tokens", f"{req.sampling['max_tokens']} is more than this server allows ({cap})")
    render_tools, sampling, constraint_param = None, req.sampling, req.constraint_param
    if req.tools is not None:   # the tools' schemas, the template's convention, a required call's grammar
        render_tools, grammar = tools.plan(req.tools, engine.chat_template, engine.tokenizer, req.prompts[0],
                                           special_in_messages)
        if grammar is not None:
            sampling, constraint_param = {**sampling, "grammar": grammar}, "tools"
    prompt_ids: list[list[int]] = []
    for p in req.prompts:
        if cancel is not None and cancel.is_set():
            return None
        if not isinstance(p, str) and req.kind == "completion":
            check_token_ids(p, vocab, "prompt")
        try:
            # The engine's own prompt rule: text and rendered chats get the BOS once, even when the
            # template already writes it; token id lists are taken as they are. A text the context
            # cannot hold is refused from its size, before it is tokenized (max_len).
            ids = engine.prompt_ids(p, max_len=n_ctx - 1, special_in_messages=special_in_messages,
                                    **({"tools": render_tools} if render_tools else {}))
        except ContextLengthError as e:
            raise APIError(400, f"This model's maximum context length is {n_ctx} tokens: {e}", param=param,
                           code="context_length_exceeded") from None
        except TemplateError as e:
            # 400, not 500: the template ran over the client's messages, and most failures are the
            # template rejecting the conversation (roles must alternate, no system role); a template
            # the sandbox refuses fails every chat request alike, and a 5xx would only make OpenAI's
            # client retry it. The message says which it was.
            raise APIError(400, f"chat template failed: {e}", param="messages", code="template_error")
        if not ids:
            raise bad(param, "the prompt is empty (no tokens)")
        if len(ids) >= n_ctx:
            raise _context_error(len(ids), n_ctx, param)
        prompt_ids.append(ids)
    if req.sampling.get("logit_bias"):
        check_token_ids(list(req.sampling["logit_bias"]), vocab, "logit_bias")
    params = []
    for p, ids in enumerate(prompt_ids):
        row = []
        for c in range(req.n):
            kw = {**OPENAI_DEFAULTS, **sampling, "seed": req.seed_for(c), "logprobs": req.logprobs}
            # No max_tokens (chat): generate until end of generation or the context is full, as OpenAI
            # (within the server's cap).
            kw.setdefault("max_tokens", min(cap, n_ctx - len(ids)))
            try:
                row.append(SamplingParams(**kw).validate(vocab))
            except InvalidParameterError as e:
                if constraint_param is not None and e.param in CONSTRAINT_FIELDS:
                    raise bad(constraint_param, str(e).split(": ", 1)[-1]) from None
                raise
        params.append(row)
    return Plan(prompt_ids, params, param)


@dataclass(frozen=True)
class Failed:
    """A choice failed in the engine (or could not be submitted); `error` is the exception."""
    error: BaseException


END = object()   # the last item of a Generation's events


class AsyncEvents:
    """A Generation's channel to one coroutine: put() from any thread, `await get()` on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)   # RuntimeError once the loop is gone

    async def get(self):
        return await self._queue.get()


class Generation:
    """One request's choices in the engine. start() (on a worker thread: building a request may
    compile a grammar) submits them; the runner thread's events go to `events.put`, in order per
    choice (events: AsyncEvents, or any object with a thread-safe put()).

    engine.submit(ids, params, sink) -> handle: handle.abort(), handle.done (threading.Event, set once
    its blocks are free), handle.token_ids (every token generated)."""

    def __init__(self, engine, plan: Plan, n: int, events, metrics=None):
        self.engine, self.plan, self.n, self.metrics = engine, plan, n, metrics
        self.events = events
        self._lock = threading.Lock()
        self._handles: list = []
        self._open = sum(len(row) for row in plan.params)    # choices not yet finished
        self._cancelled = self._ended = False
        self.started_at = time.perf_counter()
        self.finished_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(h.token_ids) for h in self._handles)

    def start(self) -> None:
        """Submit every choice; a ContextLengthError (the engine's own check) is still the client's 400."""
        try:
            for p, ids in enumerate(self.plan.prompt_ids):
                for c, sp in enumerate(self.plan.params[p]):
                    h = self.engine.submit(ids, sp, sink=partial(self._on_item, p * self.n + c))
                    with self._lock:
                        self._handles.append(h)
                        if self._cancelled:       # the client left while we submitted
                            h.abort()
        except ContextLengthError as e:     # the engine's own check (a context it sizes differently)
            self.cancel()
            raise APIError(400, str(e), param=self.plan.param, code="context_length_exceeded") from None
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Abort every choice now (idempotent; from any thread)."""
        with self._lock:
            self._cancelled = True
            handles = list(self._handles)
        for h in handles:
            h.abort()

    def settle(self, timeout: float) -> bool:
        """After cancel(): wait (blocking; run it on a thread) until every choice has left the engine;
        then completion_tokens counts exactly the tokens generated. False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            handles = list(self._handles)
        return all(h.done.wait(max(0.0, deadline - time.monotonic())) for h in handles)

    def _put(self, item) -> None:
        try:
            self.events.put(item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancel()

    def _on_item(self, index: int, item) -> None:
        """The engine's sink for choice `index`, called on its runner thread."""
        failed = isinstance(item, BaseException)
        with self._lock:      # a failed request's other choices may still report: ignored
            if self._ended:
                return
            self._ended = failed
        if failed:
            self.cancel()
            self._put(Failed(APIError(400, str(item), param=self.plan.param, code="context_length_exceeded")
                             if isinstance(item, ContextLengthError) else item))
            self._end()
            return
        if self.metrics is not None:
            self.metrics.on_tokens(len(item.token_ids))      # live, so /metrics moves mid-stream
        self._put(Delta(index, item.text, len(item.token_ids), item.logprobs, finish_reason(item.finish_reason)))
        if item.finish_reason is not None:
            with self._lock:
                self._open -= 1
                last = self._ended = self._open == 0
            if last:
                self._put(Done(self.plan.prompt_tokens, self.completion_tokens, time.perf_counter() - self.started_at))
                self._end()

    def _end(self) -> None:
        self.finished(self.completion_tokens)
        self._put(END)

    def finished(self, completion: int) -> None:
        """Count the request in the metrics once, however it ended."""
        with self._lock:
            if self.finished_at is not None:
                return
            self.finished_at = time.perf_counter()
        if self.metrics is not None:
            self.metrics.on_finished(self.plan.prompt_tokens, completion, self.finished_at - self.started_at)


def run(engine, plan: Plan, n: int, job, metrics=None, settle_s: float = 10.0) -> None:
    """The generation read on the calling thread: every choice submitted at once (they decode in
    parallel), job.emit(Delta | Done) as the events come; job.cancelled (a threading.Event) set aborts
    them all (no Done follows). A failure in the engine is raised."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    gen = Generation(engine, plan, n, events, metrics)
    gen.start()
    while True:
        try:
            item = events.get(timeout=0.1)
        except queue.Empty:
            item = None
        if job.cancelled.is_set():
            gen.cancel()
            gen.settle(settle_s)
            gen.finished(gen.completion_tokens)
            return
        if item is END:
            return
        if isinstance(item, Failed):
            raise item.error
        if item is not None:
            job.emit(item)
