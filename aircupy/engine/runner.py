"""The runner: one daemon thread owns the Scheduler, the BlockManager and the KV pool, and runs every
request through them, many sequences per forward step (continuous batching).

Other threads reach it only through commands (add, abort, reset the prefix cache, shut down), queued
under a Condition; the thread sleeps on that condition while nothing is queued or unfinished. A turn:
  1. apply the commands: an added request joins the scheduler's waiting queue (FIFO), an aborted one
     is finished at once (its blocks return to the pool before the next step);
  2. schedule(): a decode row for every running sequence, the rest of the token budget on prefill
     chunks, admission while blocks and max_num_seqs allow (engine/scheduler.py); a full pool makes
     requests wait or preempts the newest, never fails one;
  3. one model.forward_step_sample over the step, with each logits row's device sampler or None;
  4. per logits row, in order, its request takes the token (sampling the row on the host when the
     device did not) and decides its finish (engine/request.py); the step is committed with those
     reasons, and the finished sequences' blocks are freed;
  5. the stats snapshot is published, then the step's events delivered to the requests' sinks.
Speculative decoding (speculator: engine/speculative.py Speculator, None: off). Before step 2, every
running sequence with one unfed token and no constraint gets a draft (Scheduler.set_draft), at most
max_tokens - generated - 1 tokens; its verification chunk's rows all come back as logits (sampler None)
and Speculator.verify turns them into the accepted drafts plus the target's next token, each recorded
in the request's Sampler. The request then takes them one by one (step 4's stop logic per token: the
list is cut at the first that finishes it, and the cut list is committed), each with its own row for
logprobs. With speculation on, every request is sampled on the host (no device sampler: a verification
pass needs the rows anyway, and a request sampled on the device could not be drafted for); a request
with a constraint is never drafted for (the grammar would have to follow drafts it may reject) and runs
one token per step as without speculation.
A forward pass (or any turn) that raises fails every running request with that exception; the waiting
ones are kept, re-queued in order with the tokens they have (prompt + generated so far), on a fresh
scheduler and block manager (the failed step's registered blocks may hold KV never written). The pool
itself is kept: every slot is written before it is read. Later requests are served as usual.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from aircupy.engine.blocks import BlockManager
from aircupy.engine.request import RUNNER_THREAD, Request
from aircupy.engine.scheduler import Scheduler

_COUNTERS = ("requests", "cancelled_requests", "failed_requests", "prompt_tokens", "prompt_cached_tokens",
             "completion_tokens", "decode_steps")


class EngineClosedError(RuntimeError):
    """The Engine was closed: no request runs any more."""


class Runner:
    """runner = Runner(model, plan, n_ctx); runner.add(request); request.abort(); runner.stats();
    runner.reset_prefix_cache(); runner.shutdown(). plan: engine/batching.py KVPlan; speculator: a
    Speculator (engine/speculative.py) or None."""

    def __init__(self, model, plan, n_ctx: int, speculator=None):
        self.model, self.plan, self.n_ctx = model, plan, n_ctx
        self.spec = speculator
        self.kv = model.new_kv_pool(plan.num_blocks, plan.block_size)
        self.sched = self._new_scheduler()
        self._cond = threading.Condition()
        self._commands: deque = deque()
        self._closed = False
        self._reqs: dict[int, Request] = {}          # unfinished sequences' requests, by seq_id
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._counters.update(prompt_seconds=0.0, decode_seconds=0.0)
        self._engine_counts = dict(steps=0, step_tokens=0, preemptions=0, forward_errors=0)
        self._snapshot: dict = {}
        self._publish()
        self._thread = threading.Thread(target=self._loop, name=RUNNER_THREAD, daemon=True)
        self._thread.start()

    def _new_scheduler(self) -> Scheduler:
        p = self.plan
        return Scheduler(BlockManager(p.num_blocks, p.manager_block_size), max_num_seqs=p.max_num_seqs,
                         max_batched_tokens=p.max_batched_tokens, max_model_len=self.n_ctx)

    # -- commands, from any thread ------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req._abort = self._abort
        self._command(("add", req))

    def _abort(self, req: Request) -> None:
        self._command(("abort", req), closed_ok=True)

    def reset_prefix_cache(self) -> None:
        self._command(("reset", None))

    def _command(self, cmd, closed_ok: bool = False) -> None:
        with self._cond:
            if self._closed:
                if closed_ok:
                    return
                raise EngineClosedError("the engine is closed")
            self._commands.append(cmd)
            self._cond.notify()

    def shutdown(self, timeout: float | None = None) -> None:
        """Fail every unfinished request with EngineClosedError and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        """The counters and the scheduler's state as of the end of the last turn."""
        with self._cond:
            return dict(self._snapshot)

    # -- the thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self._closed and not self.sched.has_unfinished():
                    self._cond.wait()
                commands, closed = list(self._commands), self._closed
                self._commands.clear()
            released: list[Request] = []
            for kind, req in commands:
                try:
                    self._apply(kind, req, released)
                except Exception as e:  # noqa: BLE001 - a bug here must not hang every consumer
                    self._recover(e, released)
            if closed:
                self._close_all(released)
                return
            self._publish()
            self._release(released)
            if self.sched.has_unfinished():
                events: list = []
                try:
                    self._step(events, released)
                except Exception as e:  # noqa: BLE001 - the forward failed: its requests fail, we go on
                    events.clear()
                    self._recover(e, released)
                self._publish()
                gone: set[int] = set()               # a request may have several events (speculation)
                for req, ev in events:
                    if id(req) in gone:
                        continue
                    if not req.emit(ev):            # the consumer is gone: stop it before the next step
                        gone.add(id(req))
                        self._finish(req, released)
                self._release(released)

    def _apply(self, kind: str, req: Request | None, released: list[Request]) -> None:
        if kind == "add":
            try:
                host = self.spec is not None or not req.wants_device_sampler()
                device = None if host else self.model.new_sampler(req.params)
                req.device_sampler = device if getattr(device, "supported", True) else None
                seq = self.sched.add(req.prompt_ids, params=req)
            except Exception as e:  # noqa: BLE001 - the engine checked; a model with a smaller pool may not
                self._fail(req, e, released)
                return
            req.seq_id = seq.seq_id
            self._reqs[seq.seq_id] = req
        elif kind == "abort":       # after its add (commands are FIFO); a no-op once it has left
            if req.seq_id is not None and self._reqs.get(req.seq_id) is req:
                self._finish(req, released)
        elif kind == "reset":
            self.sched.blocks.clear_cache()

    def _finish(self, req: Request, released: list[Request]) -> None:
        """Finish an unfinished request now (aborted, or its sink failed): blocks freed, no event."""
        if self._reqs.get(req.seq_id) is not req:      # it has left already (its last event was refused)
            return
        self.sched.finish(req.seq_id, "abort")
        del self._reqs[req.seq_id]
        self._forget(req.seq_id)
        self._record(req)
        released.append(req)

    def _step(self, events: list, released: list[Request]) -> None:
        if self.spec is not None:
            self._draft()
        step = self.sched.schedule()
        now = time.perf_counter()
        for ch in step.chunks:
            seq = self.sched.get(ch.seq_id)
            self._reqs[ch.seq_id].scheduled(now, seq.num_cached_tokens)
        reqs = [self._reqs[ch.seq_id] for ch in step.logits_chunks]
        samplers = []                   # one per logits row: a verification chunk's rows come back as logits
        for ch, req in zip(step.logits_chunks, reqs):
            samplers += [None] * ch.num_logits if ch.num_draft else [req.device_sampler]
        ids, logits = self.model.forward_step_sample(step.arrays(), self.kv, samplers)
        c = self._engine_counts
        c["steps"] += 1
        c["step_tokens"] += step.num_tokens
        c["preemptions"] += len(step.preempted)
        tokens, finish = [], []
        for ch, rows, req in zip(step.logits_chunks, step.logits_slices, reqs):
            try:
                taken, evs = self._take(req, ch, ids[rows], None if logits is None else logits[rows])
            except Exception as e:  # noqa: BLE001 - this request's sampling failed (its grammar): it alone fails
                self.sched.finish(req.seq_id, "error")      # commit() skips its chunk
                del self._reqs[req.seq_id]
                self._forget(req.seq_id)
                self._fail(req, e, released)
                tokens.append(0)
                finish.append(None)
                continue
            events += evs
            tokens.append(taken if ch.num_draft else taken[0])
            finish.append(req.finish_reason)
        for seq in self.sched.commit(step, tokens, finish):
            req = self._reqs.pop(seq.seq_id)
            self._forget(seq.seq_id)
            self._record(req)
            released.append(req)

    def _draft(self) -> None:
        """Drafts for the decoding sequences of the next step (see the module docstring)."""
        for seq in self.sched.running:
            req = self._reqs.get(seq.seq_id)
            if seq.num_unfed != 1 or req is None or req.constraint is not None:
                continue
            d = self.spec.draft(seq.seq_id, seq.token_ids, req.sampler, req.params.max_tokens - len(req.token_ids) - 1)
            if len(d):
                self.sched.set_draft(seq.seq_id, d.tokens)

    def _take(self, req: Request, ch, ids, rows) -> tuple[list[int], list]:
        """The tokens req's logits chunk gives, cut at the first that finishes the request, and their
        events. ids/rows: the chunk's device-sampled ids (-1: none) and logits rows (None: none)."""
        if self.spec is not None and req.constraint is None:
            toks = self.spec.verify(ch.seq_id, ch.draft, rows, req.sampler)   # recorded in req.sampler
        else:
            toks = [int(ids[0])]          # -1: take() samples the row
        taken, evs = [], []
        for j, t in enumerate(toks):
            ev = req.take(t, None if rows is None else rows[j])
            taken.append(req.token_ids[-1])
            evs.append((req, ev))
            if ev.finish_reason is not None:
                break
        return taken, evs

    def _forget(self, seq_id: int) -> None:
        """A sequence left: its draft state goes (a draft model's cache, its adaptive k)."""
        if self.spec is not None:
            self.spec.release(seq_id)

    def _recover(self, error: BaseException, released: list[Request]) -> None:
        """After a failed turn: fail the running requests, re-queue the waiting ones on a fresh
        scheduler (see the module docstring)."""
        self._engine_counts["forward_errors"] += 1
        old = self.sched
        for s in list(old.running) + list(old.waiting):     # the fresh scheduler reuses the seq ids
            self._forget(s.seq_id)
        waiting = [s for s in old.waiting if s.seq_id in self._reqs]
        for s in list(old.running):
            req = self._reqs.pop(s.seq_id, None)
            if req is not None:
                self._fail(req, error, released)
        self.sched = self._new_scheduler()
        reqs, self._reqs = self._reqs, {}
        for s in waiting:
            req = reqs.pop(s.seq_id)
            try:
                seq = self.sched.add(s.token_ids, params=req)
            except Exception as e:  # noqa: BLE001 - never let the recovery itself kill the thread
                self._fail(req, e, released)
                continue
            req.seq_id = seq.seq_id
            self._reqs[seq.seq_id] = req
        for req in reqs.values():        # neither running nor waiting: cannot happen, but never hang
            self._fail(req, error, released)

    def _fail(self, req: Request, error: BaseException, released: list[Request]) -> None:
        req.fail(error)
        self._counters["failed_requests"] += 1
        self._record(req)
        released.append(req)

    def _close_all(self, released: list[Request]) -> None:
        error = EngineClosedError("the engine was closed while this request ran")
        with self._cond:
            pending = [req for kind, req in self._commands if kind == "add"]
            self._commands.clear()
        for req in list(self._reqs.values()) + pending:
            self._fail(req, error, released)
        self._reqs.clear()
        self._publish()
        self._release(released)

    @staticmethod
    def _release(released: list[Request]) -> None:
        for req in released:
            req.done.set()
        released.clear()

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _record(self, req: Request) -> None:
        """Add a request that left the runner to the counters."""
        c, t = self._counters, req.timer
        c["requests"] += 1
        c["cancelled_requests"] += req.finish_reason is None
        c["prompt_tokens"] += len(req.prompt_ids)
        c["prompt_cached_tokens"] += t.prompt_cached
        c["completion_tokens"] += len(req.token_ids)
        c["prompt_seconds"] += t.prompt_s
        c["decode_seconds"] += t.decode_s
        c["decode_steps"] += t.decode_steps

    def _publish(self) -> None:
        s = self.sched
        b = s.blocks
        c = self._counters
        snap = dict(c, **self._engine_counts)
        snap.update(running=len(s.running), waiting=len(s.waiting), kv_blocks_used=b.num_used,
                    kv_blocks_free=b.num_free, kv_blocks_cached=b.num_cached, kv_blocks_total=b.num_blocks,
                    kv_block_size=self.plan.block_size, kv_cache_tokens=self.plan.tokens,
                    prefix_cache_hit_rate=c["prompt_cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0,
                    max_num_seqs=s.max_num_seqs, max_batched_tokens=s.max_batched_tokens)
        if self.spec is not None:
            snap.update(self.spec.stats.as_dict())
        with self._cond:
            self._snapshot = snap
