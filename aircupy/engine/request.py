"""One request's host side: what it asked, what it generated, and the per-token decisions the runner
thread asks of it; and TokenStream, the iterator Engine.stream() hands its caller.

Per generated token (Request.take, on the runner thread, for the logits row the request's sequence got):
sample it on the host unless the model's device sampler already did -> decide whether it ends the
request -> build its StreamEvent. The runner commits the step and only then delivers the events
(Request.emit), so a consumer that sees a request's last event finds its KV blocks already free.

The request finishes with:
  "stop"    an end-of-generation id (unless ignore_eos) or a stop string (its text is never emitted);
            with a constraint (params.constraint), also the grammar's completion (its last token is
            emitted), and an end-of-generation id ends it even with ignore_eos (the mask allows one only
            where the grammar accepts);
  "length"  max_tokens reached, or the sequence (prompt + generated) filled n_ctx.
An aborted request (its consumer left) gets no further event; a failed one (the forward pass raised)
gets the exception as its last item.

The sink is the consumer's: called on the runner thread with each StreamEvent, then possibly an
exception; it must not block (a queue's put, or loop.call_soon_threadsafe for an asyncio consumer).
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from aircupy.engine.params import SamplingParams
from aircupy.engine.results import GenerationResult, StreamEvent, Timer, TokenLogprob, usage
from aircupy.engine.sampler import Sampler, token_logprobs
from aircupy.engine.stop import StopMatcher


class Request:
    """State of one generation. Built on the caller's thread (the grammar is compiled there, so a bad
    one fails at submission); driven by the runner thread from then on. `done` is set once the runner
    has let it go (finished, aborted or failed): its KV blocks are free by then."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams, sink):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.timer = Timer()                    # starts now: ttft counts the wait for a place in the batch
        self.stop = StopMatcher(params.stop)
        self.constraint = engine.new_constraint_state(params.constraint) if params.constraint is not None else None
        tok = engine.tokenizer
        self._eog = frozenset() if params.ignore_eos and params.constraint is None else frozenset(tok.eog_ids)
        self.sampler = Sampler(params, engine.config.vocab_size, self.prompt_ids, constraint=self.constraint,
                               end_ids=tok.eog_ids)
        self.decoder = engine.new_decoder()
        self.n_ctx = engine.n_ctx
        self.device_sampler = None               # set by the runner (the model's, when it covers params)
        self.seq_id: int | None = None
        self.done = threading.Event()
        self._sink = sink
        self._abort = None                       # set by the runner: abort this request
        self._t_first_step: float | None = None
        self._t_first_token: float | None = None

    # -- the consumer's side -------------------------------------------------------------------------
    def abort(self) -> None:
        """Stop generating: the runner finishes the sequence before its next step and frees its blocks;
        no event follows. Safe from any thread, at any time (a no-op once done)."""
        if self._abort is not None and not self.done.is_set():
            self._abort(self)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self.text_parts), token_ids=list(self.token_ids),
            prompt_token_ids=list(self.prompt_ids), finish_reason=self.finish_reason or "stop",
            usage=usage(len(self.prompt_ids), len(self.token_ids)), timings=self.timer.as_dict(),
            logprobs=self.logprobs, stop_string=self.stop.matched)

    # -- the runner's side ---------------------------------------------------------------------------
    def wants_device_sampler(self) -> bool:
        """Logprobs need the raw logits, and a constraint's mask is applied on the host."""
        return self.logprobs is None and self.params.constraint is None

    def scheduled(self, now: float, cached_tokens: int | None) -> None:
        """A step that runs a chunk of this request starts at `now`; the first one fixes what the
        prefix cache gave (Sequence.num_cached_tokens) and starts the prompt's clock."""
        if self._t_first_step is None:
            self._t_first_step = now
            cached = cached_tokens or 0
            self.timer.prompt_cached, self.timer.prompt_evaluated = cached, len(self.prompt_ids) - cached

    def take(self, token_id: int, row) -> StreamEvent:
        """The token of this request's logits row: token_id when the device sampled it (>= 0), else
        sampled here from `row` (vocab,). Decides the finish and returns the step's event."""
        p = self.params
        t_id = int(token_id) if token_id >= 0 else self.sampler.sample(np.asarray(row))
        self.token_ids.append(t_id)
        lps = None
        if self.logprobs is not None:
            lps = (self._logprob(np.asarray(row), t_id),)
            self.logprobs.extend(lps)
        if t_id in self._eog:
            text, finish = "", "stop"
        else:
            text = self.stop.push(self.decoder.push(t_id))
            finish = "stop" if self.stop.stopped or (self.constraint is not None and self.constraint.done) else None
        n = len(self.token_ids)
        if finish is None and (n >= p.max_tokens or len(self.prompt_ids) + n >= self.n_ctx):
            finish = "length"
        if finish is not None and not self.stop.stopped:
            text += self.stop.push(self.decoder.flush())  # an incomplete character's bytes, if any
            text += self.stop.flush()                     # a tail held back that never became a stop string
            if self.stop.stopped:
                finish = "stop"
        now = time.perf_counter()
        if self._t_first_token is None:
            self._t_first_token = now
            self.timer.ttft_s = now - self.timer.start
            self.timer.prompt_s = now - (self._t_first_step or self.timer.start)
        else:
            self.timer.decode_s = now - self._t_first_token
            self.timer.decode_steps += 1
        self.finish_reason = finish
        self.text_parts.append(text)
        return StreamEvent(text=text, token_ids=(t_id,), finish_reason=finish, logprobs=lps,
                           result=self.result() if finish else None)

    def emit(self, item) -> bool:
        """Hand a StreamEvent (or the exception that failed the request) to the consumer; False when
        the sink raised (its consumer is gone: the runner aborts the request)."""
        try:
            self._sink(item)
            return True
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the runner
            return False

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.emit(error)

    def _logprob(self, row: np.ndarray, t_id: int) -> TokenLogprob:
        text = self.engine.tokenizer.token_text
        lp, top = token_logprobs(row, t_id, self.params.logprobs)
        return TokenLogprob(t_id, text(t_id), lp, tuple((i, text(i), v) for i, v in top))


class TokenStream:
    """The StreamEvents of one request, as an iterator; close() (or leaving a `with` block, or the
    stream being garbage collected) aborts the request at once. A failure raises from next()."""

    def __init__(self, submit, *args):
        """submit(*args, sink) -> Request: the Engine's submission (raises for bad arguments, now)."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False
        self.request: Request = submit(*args, self._queue.put)

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> StreamEvent:
        if self._ended:
            raise StopIteration
        try:
            item = self._queue.get()
        except BaseException:       # KeyboardInterrupt while waiting: the request must not run on
            self.close()
            raise
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    def close(self, wait: bool = True) -> None:
        """Abort the request if it is unfinished; with wait, return once its blocks are free (at most
        the forward step in flight; never waits on the runner thread itself)."""
        if self._ended:
            return
        self._ended = True
        req = self.request
        req.abort()
        if wait and threading.current_thread().name != RUNNER_THREAD:
            req.done.wait()

    def result(self) -> GenerationResult:
        """Drain the stream; the finished request's result (raises its failure)."""
        for _ in self:
            pass
        return self.request.result()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close(wait=False)
        except Exception:  # noqa: BLE001 - at interpreter exit the runner may be gone
            pass


RUNNER_THREAD = "aircupy-runner"
