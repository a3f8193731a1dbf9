"""One request's decode loop: prefill (reusing the KV cache's common prefix), then sample, emit, feed back.

Step order per generated token:  sample from the last logits -> decide whether it ends the request ->
yield its StreamEvent -> only then run the forward pass that feeds it back. Yielding first gives the
consumer the token as early as possible, and a consumer that closes the stream at that yield stops the
work before the next forward pass (cancellation costs at most the step in flight).

The request finishes with:
  "stop"    an end-of-generation id (unless ignore_eos) or a stop string (its text is never emitted);
            with a constraint (params.constraint), also the grammar's completion (its last token is
            emitted), and an end-of-generation id ends it even with ignore_eos (the mask allows one only
            where the grammar accepts);
  "length"  max_tokens reached, or the sequence (prompt + generated) filled n_ctx.
"""
from __future__ import annotations

import time

import numpy as np

from aircupy.engine.params import SamplingParams
from aircupy.engine.results import GenerationResult, StreamEvent, Timer, TokenLogprob, usage
from aircupy.engine.sampler import Sampler, token_logprobs
from aircupy.engine.stop import StopMatcher

# Prompt tokens per forward call during prefill: bounds the (heads, T, S) attention scores in memory
# (9 heads x 512 x 4096 x 4 B = 75 MB for SmolLM2 at a full context) at little cost in BLAS efficiency.
PREFILL_CHUNK = 512


class KVState:
    """The Engine's one KV cache and the token ids it holds, kept in step: ids[i] is at position i."""

    def __init__(self, model, n_ctx: int):
        self.model = model
        self.cache = model.new_cache(n_ctx)
        self.ids: list[int] = []

    def reset(self) -> None:
        self.cache.truncate(0)
        self.ids = []

    def prefill(self, prompt_ids: list[int], sampler=None) -> tuple[np.ndarray | int, int]:
        """After the whole prompt: its last logits (1, vocab), or with a model-side `sampler` the id
        the model sampled from them (feed_sample); and how many prompt tokens were reused.

        The longest common prefix with what the cache holds is kept (cache.truncate), but never the whole
        prompt: its last token must run again to produce the logits.
        """
        n = 0
        limit = min(len(self.ids), len(prompt_ids) - 1)
        if self.cache.length == len(self.ids):  # trust the prefix only while both agree
            while n < limit and self.ids[n] == prompt_ids[n]:
                n += 1
        reused = n
        self.cache.truncate(n)
        self.ids = self.ids[:n]
        out = None
        while n < len(prompt_ids):
            chunk = prompt_ids[n:n + PREFILL_CHUNK]
            last = n + len(chunk) == len(prompt_ids)
            out = self.feed_sample(chunk, sampler) if last and sampler is not None else self.feed(chunk)
            n += len(chunk)
        return out, reused

    def feed(self, ids: list[int]) -> np.ndarray:
        """Run `ids` after the cached tokens; the last position's logits (1, vocab)."""
        return self._run(ids, lambda *args: self.model.forward(*args))

    def feed_sample(self, ids: list[int], sampler) -> int:
        """Run `ids` after the cached tokens; the next id, sampled by the model from the last position
        (on the GPU only the id crosses to the host)."""
        return self._run(ids, lambda *args: self.model.forward_sample(*args, sampler))

    def _run(self, ids: list[int], step):
        """On any failure forget the cache rather than trust it."""
        start = len(self.ids)
        try:
            out = step(np.asarray(ids, dtype=np.int32), np.arange(start, start + len(ids), dtype=np.int32),
                       self.cache)
        except BaseException:
            self.reset()
            raise
        self.ids.extend(int(t) for t in ids)
        return out


class Request:
    """State of one generation; events() runs it (the caller holds the Engine's lock around it)."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.timer = Timer()
        self.stop = StopMatcher(params.stop)
        # Built here, not in events(): a grammar the vocabulary cannot serve fails when the request is made.
        self.constraint = engine.new_constraint_state(params.constraint) if params.constraint is not None else None

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self.text_parts), token_ids=list(self.token_ids),
            prompt_token_ids=list(self.prompt_ids), finish_reason=self.finish_reason or "stop",
            usage=usage(len(self.prompt_ids), len(self.token_ids)), timings=self.timer.as_dict(),
            logprobs=self.logprobs, stop_string=self.stop.matched)

    def events(self, kv: KVState):
        eng, p, timer = self.engine, self.params, self.timer
        tok = eng.tokenizer
        eog = frozenset() if p.ignore_eos and p.constraint is None else frozenset(tok.eog_ids)
        state = self.constraint
        sampler = Sampler(p, eng.config.vocab_size, self.prompt_ids, constraint=state, end_ids=tok.eog_ids)
        device = self._device_sampler(eng.model)
        decoder = eng.new_decoder()
        n_prompt, n_ctx = len(self.prompt_ids), eng.n_ctx

        t0 = timer.start = time.perf_counter()  # from here: time waiting for the Engine's lock is not ttft
        logits, reused = kv.prefill(self.prompt_ids, device)
        timer.prompt_s = time.perf_counter() - t0
        timer.prompt_cached, timer.prompt_evaluated = reused, n_prompt - reused
        t_step = time.perf_counter()
        while True:
            if device is not None:
                t_id, row = int(logits), None   # sampled on the device by the last forward
            else:
                row = np.asarray(logits[-1])
                t_id = sampler.sample(row)
            self.token_ids.append(t_id)
            lps = None
            if self.logprobs is not None:
                lps = (self._logprob(row, t_id),)
                self.logprobs.extend(lps)
            if t_id in eog:
                text, finish = "", "stop"
            else:
                text = self.stop.push(decoder.push(t_id))
                finish = "stop" if self.stop.stopped or (state is not None and state.done) else None
            if finish is None and (len(self.token_ids) >= p.max_tokens or n_prompt + len(self.token_ids) >= n_ctx):
                finish = "length"
            if finish is not None and not self.stop.stopped:
                text += self.stop.push(decoder.flush())  # an incomplete character's bytes, if any
                text += self.stop.flush()                # a tail held back that never became a stop string
                if self.stop.stopped:
                    finish = "stop"
            now = time.perf_counter()
            if timer.ttft_s is None:
                timer.ttft_s = now - timer.start
            else:
                timer.decode_s += now - t_step
            self.finish_reason = finish
            self.text_parts.append(text)
            event = StreamEvent(text=text, token_ids=(t_id,), finish_reason=finish, logprobs=lps,
                                result=self.result() if finish else None)
            yield event
            if finish is not None:
                return
            t_step = time.perf_counter()
            logits = kv.feed([t_id]) if device is None else kv.feed_sample([t_id], device)
            timer.decode_steps += 1

    def _device_sampler(self, model):
        """The model's own sampler when it covers these parameters (GPU backend: temperature,
        top-k/p, min-p, seed), so that only token ids cross to the host; None otherwise (numpy
        backend; logprobs, logit bias or penalties, which the host sampler applies to logits; a
        constraint, whose mask is applied on the host: device-side masking is not implemented)."""
        if self.logprobs is not None or self.params.constraint is not None:
            return None
        return model.new_sampler(self.params)

    def _logprob(self, row: np.ndarray, t_id: int) -> TokenLogprob:
        text = self.engine.tokenizer.token_text
        lp, top = token_logprobs(row, t_id, self.params.logprobs)
        return TokenLogprob(t_id, text(t_id), lp, tuple((i, text(i), v) for i, v in top))
