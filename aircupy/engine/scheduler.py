"""Continuous batching: which sequences run in the next forward step, and which of their tokens.

    sched = Scheduler(BlockManager(num_blocks=1024, block_size=16), max_num_seqs=32, max_batched_tokens=512)
    seq = sched.add(prompt_ids, params)            # ContextLengthError if it can never fit
    while sched.has_unfinished():
        step = sched.schedule()                    # a Step (engine/step.py): plain data
        ids = runner.run(step)                     # one sampled id per step.logits_chunks
        sched.commit(step, ids, finish=reasons)    # the caller's stop decisions, one per id (or None)

A sequence's tokens are prompt + generated; num_computed_tokens of them have their KV written, and an
unfinished sequence always has at least one token not yet fed (the last sampled one, or the rest of
its prompt). Prefill and decode are the same thing: run the unfed tokens; a sequence with exactly one
is decoding. A running sequence holds blocks for all its tokens except perhaps the last sampled one
(admission allocates the whole prompt; a decode row adds the block its slot needs). Each schedule():
  1. decode: every running sequence with one unfed token gets one row, oldest first. Its next slot
     may need a new block; while none is free the newest running sequence (possibly the one asking)
     is preempted, by the preemption policy (recompute: its blocks are freed). The token budget always covers these rows
     (max_batched_tokens >= max_num_seqs).
  2. prefill: the rest of the budget goes to running sequences with several unfed tokens (a prompt
     split over steps, or one recomputed after a rollback), oldest first, then to waiting sequences
     in FIFO order, each admitted only if its blocks (after prefix-cache hits) are free and fewer than
     max_num_seqs run. The first that does not fit stops admission: a later one never overtakes it.
     No admission in a step that preempted (it would take the blocks back at once).
Chunks take min(unfed, budget left) tokens, so a long prompt spreads over steps and a step mixes decode
rows and prefill chunks. A chunk that ends its sequence's unfed tokens yields logits.

Speculative decoding. set_draft(seq_id, tokens) hands a decoding sequence k drafted tokens for its
next step: its decode row becomes a verification chunk of 1 + k rows (the last sampled token, then the
drafts), every row a logits row (engine/step.py). Drafts come after every decode row has its slot
(pass 1, preempting as above) and before prefill (pass 2, like vLLM's running-first order; a runner
that wants prompts to go first caps k): oldest first, each cut to the token budget left and to the
blocks free without preempting anyone (a draft never costs another sequence its place), and to
max_model_len. commit() takes, for a verification chunk, the
accepted tokens: the accepted prefix of the drafts plus the target's own next token (1 to k + 1 ids).
The KV of the last sampled token and of the accepted drafts stays; the rejected rows' KV is dropped and
the blocks only they used return (the block holding the next token's slot is kept). Blocks are offered
to the prefix cache only once they hold accepted tokens. A draft is for one step: schedule() consumes
it, and preemption, rollback and finish drop it.

Order invariant (what keeps preemption fair and admission FIFO): running and waiting are each in
arrival order, and every running sequence arrived before every waiting one. Admission takes the oldest
waiting; preemption sends the newest running to the front of waiting.

One thread drives a Scheduler. finish() may come at any time, even between schedule() and commit()
(a client gone): its blocks return at once and commit() skips its chunk.
"""
from __future__ import annotations

import enum
from collections import deque

import numpy as np

from aircupy.engine.blocks import BlockManager, BlockTable
from aircupy.engine.step import ScheduledChunk, Step
from aircupy.errors import ContextLengthError


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One generation's tokens and KV bookkeeping; `params` is the caller's (sampling settings, sinks).

    num_cached_tokens: prompt tokens found in the prefix cache at the first admission (what usage
    reports as cached); re-admissions after preemption show in the block manager's statistics.
    """

    def __init__(self, seq_id: int, prompt_ids, params=None, arrival: int = 0):
        self.seq_id = seq_id
        self.prompt_ids = tuple(int(t) for t in prompt_ids)
        self.token_ids = list(self.prompt_ids)
        self.params = params
        self.arrival = arrival
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None     # set at the first admission
        self.table = BlockTable()
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.draft: list[int] = []      # drafted tokens for the next step (set_draft)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_unfed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def block_table(self) -> list[int]:
        return list(self.table.ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens} "
                f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens}, blocks={self.table.ids})")


class RecomputePreemption:
    """How a victim gives up its blocks: freed (their full blocks stay in the prefix cache), its KV
    rebuilt through the ordinary admission when its turn comes again. Which sequence is the victim is
    the scheduler's rule (the newest), not the policy's. A swap-to-RAM policy would copy the blocks
    to host memory here, and needs two more things: a swap-in at re-admission and the copies listed
    in the Step for the runner."""

    def preempt(self, seq: Sequence, blocks: BlockManager) -> None:
        blocks.free(seq.table)
        seq.num_computed_tokens = 0


class Scheduler:
    """Waiting and running queues over one BlockManager; see the module docstring for the rules.

    max_num_seqs        sequences running at once (in the batch) at most.
    max_batched_tokens  tokens per step at most (decode rows + prefill chunks); >= max_num_seqs.
    max_model_len       tokens (prompt + generated) per sequence; at most the cache's capacity
                        (num_blocks * block_size), which is the default. A sequence that reaches it
                        is finished with "length" by commit(), so none ever outgrows the cache.
    """

    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_batched_tokens: int = 2048,
                 max_model_len: int | None = None, preemption=None):
        capacity = blocks.num_blocks * blocks.block_size
        max_model_len = capacity if max_model_len is None else max_model_len
        if not 1 <= max_num_seqs <= max_batched_tokens:
            raise ValueError(f"need 1 <= max_num_seqs ({max_num_seqs}) <= max_batched_tokens "
                             f"({max_batched_tokens}): every running sequence must get its decode row")
        if not 2 <= max_model_len <= capacity:
            raise ValueError(f"max_model_len must be in [2, {capacity}] (num_blocks x block_size), got {max_model_len}")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_model_len = max_model_len
        self.preemption = preemption if preemption is not None else RecomputePreemption()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seqs: dict[int, Sequence] = {}          # unfinished sequences by id
        self._next_id = 0
        self._in_flight: Step | None = None
        # tokens scheduled (a sequence finished while its step ran still counts)
        self.num_steps = self.num_preemptions = self.prefill_tokens = self.decode_tokens = 0
        self.draft_tokens = self.accepted_draft_tokens = 0   # drafts scheduled; of which accepted

    # -- sequences in and out ---------------------------------------------------------------------
    def add(self, prompt_ids, params=None) -> Sequence:
        """Queue a prompt; raise ContextLengthError now if it can never run (it would wait forever)."""
        seq = Sequence(self._next_id, prompt_ids, params, arrival=self._next_id)
        n, B = seq.num_prompt_tokens, self.blocks.block_size
        if n == 0:
            raise ValueError("the prompt is empty")
        if self.blocks.blocks_for(n) > self.blocks.num_blocks:
            raise ContextLengthError(f"the prompt is {n} tokens: {self.blocks.blocks_for(n)} KV blocks of {B} "
                                     f"tokens, but the cache has {self.blocks.num_blocks} blocks")
        if n >= self.max_model_len:
            raise ContextLengthError(f"the prompt is {n} tokens but a sequence holds {self.max_model_len} "
                                     f"(max_model_len), leaving no room to generate")
        self._next_id += 1
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)
        return seq

    def get(self, seq_id: int) -> Sequence | None:
        """An unfinished sequence by id."""
        return self._seqs.get(seq_id)

    def finish(self, seq_id: int, reason: str = "abort") -> Sequence | None:
        """Finish a sequence now, wherever it is (a stop, a client gone): every block returns at once.
        None if it had already finished."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        seq.table.hashes.clear()
        seq.draft = []
        seq.status, seq.finish_reason = Status.FINISHED, reason
        return seq

    def abort_all(self, reason: str = "abort") -> list[Sequence]:
        """Finish every sequence and forget the prefix cache (after a failed step, registered blocks
        may hold KV that was never written)."""
        done = [self.finish(s, reason) for s in list(self._seqs)]
        self.blocks.clear_cache()
        self._in_flight = None
        return done

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        """Keep the first num_tokens tokens (at least the prompt) and drop the rest with their KV, e.g.
        rejected speculative tokens. The last kept token is fed again to produce the next logits."""
        if self._in_flight is not None:
            raise RuntimeError("rollback() between schedule() and commit()")
        seq = self._seqs[seq_id]
        if not seq.num_prompt_tokens <= num_tokens <= seq.num_tokens:
            raise ValueError(f"rollback to {num_tokens} tokens: must be in [{seq.num_prompt_tokens}, {seq.num_tokens}]")
        del seq.token_ids[num_tokens:]
        seq.draft = []
        seq.num_computed_tokens = self.blocks.truncate(seq.table, min(seq.num_computed_tokens, num_tokens - 1))
        if seq.status is Status.RUNNING:
            # The truncation may have dropped a shared block: get blocks for every token again (a
            # running sequence always has them), preempting as a decode would.
            self._reserve(seq, seq.num_tokens, [])

    def set_draft(self, seq_id: int, tokens) -> int:
        """Drafted tokens to verify in seq_id's next step (replacing any set before); returns how many
        were kept: none unless the sequence is running and decoding (one unfed token), and at most
        max_model_len - num_tokens - 1, so that every draft accepted plus the bonus token still fits.
        schedule() may cut them further (budget, free blocks)."""
        if self._in_flight is not None:
            raise RuntimeError("set_draft() between schedule() and commit()")
        seq = self._seqs[seq_id]
        tokens = [int(t) for t in tokens]
        if seq.status is not Status.RUNNING or seq.num_unfed != 1:
            tokens = []
        seq.draft = tokens[:max(0, self.max_model_len - seq.num_tokens - 1)]
        return len(seq.draft)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self) -> Step:
        """The next step (see the module docstring); empty only when no sequence is unfinished."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() before the previous step was committed")
        budget = self.max_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[int] = []
        decoding = []
        for seq in list(self.running):                       # 1. decode rows, oldest first
            if seq.status is Status.RUNNING and seq.num_unfed == 1 \
                    and self._reserve(seq, seq.num_tokens, preempted):
                decoding.append(seq)
        budget -= len(decoding)
        self.decode_tokens += len(decoding)
        assert budget >= 0
        for seq in decoding:                                 # 1b. drafts from what is left, oldest first
            k = min(len(seq.draft), budget)
            while k and self.blocks.blocks_to_grow(seq.table, seq.num_tokens + k) > self.blocks.num_free:
                k -= 1
            self.blocks.grow(seq.table, seq.num_tokens + k)
            chunks.append(self._chunk(seq, 1, seq.draft[:k]))
            seq.draft = []
            budget -= k
            self.draft_tokens += k
        for seq in self.running:                             # 2a. prompts under way, oldest first
            if seq.num_unfed > 1 and budget:
                k = min(seq.num_unfed, budget)
                chunks.append(self._chunk(seq, k))
                budget -= k
                self.prefill_tokens += k
        while not preempted and budget and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]                            # 2b. admission, FIFO
            if self.blocks.blocks_to_admit(seq.table, seq.token_ids) > self.blocks.num_free:
                break
            self.waiting.popleft()
            seq.num_computed_tokens = self.blocks.admit(seq.table, seq.token_ids)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            k = min(seq.num_unfed, budget)
            chunks.append(self._chunk(seq, k))
            budget -= k
            self.prefill_tokens += k
        step = Step(tuple(chunks), tuple(preempted))
        self._in_flight = step
        self.num_steps += 1
        return step

    def commit(self, step: Step, sampled_ids, finish=None) -> list[Sequence]:
        """Record a step's result: every chunk's KV is written; each logits chunk's sequence (same
        order as step.logits_chunks) gets its sampled id, or for a verification chunk the list of
        accepted tokens (the accepted draft prefix and the target's next token, cut by the caller at
        a stop), and finishes when finish[i] gives a reason (the caller's: eos, stop string,
        max_tokens) or when it reaches max_model_len ("length"). Returns the sequences this
        finished. Chunks of sequences finished meanwhile are skipped."""
        if step is not self._in_flight:
            raise RuntimeError("commit() of a step that is not the one in flight")
        logits_chunks = step.logits_chunks
        n_logits = len(logits_chunks)
        sampled = [_accepted(ch, x) for ch, x in zip(logits_chunks, sampled_ids)]
        finish = [None] * n_logits if finish is None else list(finish)
        if len(sampled) != n_logits or len(sampled_ids) != n_logits or len(finish) != n_logits:
            raise ValueError(f"the step has {n_logits} logits chunks: got {len(sampled_ids)} ids, {len(finish)} reasons")
        self._in_flight = None
        done, j = [], 0
        for ch in step.chunks:
            if ch.logits:
                tokens, reason = sampled[j], finish[j]
                j += 1
            seq = self._seqs.get(ch.seq_id)
            if seq is None:
                continue
            assert seq.num_computed_tokens == ch.start and seq.status is Status.RUNNING, (seq, ch)
            if ch.num_draft:
                # KV stands for the last sampled token and the accepted drafts; the rejected rows'
                # blocks return, all but the one the next token's slot is in.
                seq.num_computed_tokens = ch.start + len(tokens)
                seq.token_ids.extend(tokens)
                kept = self.blocks.truncate(seq.table, seq.num_tokens)
                assert kept >= seq.num_computed_tokens, (seq, kept)
                self.blocks.register_full(seq.table, seq.token_ids, seq.num_computed_tokens)
                self.accepted_draft_tokens += len(tokens) - 1
            else:
                seq.num_computed_tokens = ch.end
                if ch.logits:
                    seq.token_ids.extend(tokens)
            if ch.logits:
                if reason is None and seq.num_tokens >= self.max_model_len:
                    reason = "length"
                if reason is not None:
                    done.append(self.finish(seq.seq_id, reason))
        return done

    # -- pieces of schedule() ------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, need: int, preempted: list[int]) -> bool:
        """Blocks for positions [0, need) of running seq, preempting the newest running sequences while
        too few are free; False when seq itself was preempted. The newest, always: it keeps the order
        invariant, and in pass 1 it is never a sequence already given a row (those are older)."""
        while self.blocks.blocks_to_grow(seq.table, need) > self.blocks.num_free:
            victim = self.running.pop()
            self.preemption.preempt(victim, self.blocks)
            victim.status = Status.WAITING
            victim.num_preemptions += 1
            victim.draft = []
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        self.blocks.grow(seq.table, need)
        return True

    def _chunk(self, seq: Sequence, k: int, draft=()) -> ScheduledChunk:
        """Schedule seq's next k tokens, then the drafted ones after them: their write slots, and the
        full blocks of the sequence's own tokens offered to the cache (their KV exists once this step
        has run; register_full stops at the end of token_ids, before any draft)."""
        assert 1 <= k <= seq.num_unfed and (not draft or k == seq.num_unfed), (seq, k)
        c, end = seq.num_computed_tokens, seq.num_computed_tokens + k + len(draft)
        slots = self.blocks.slots(seq.table, c, end, write=True)   # asserts the blocks exist, unshared
        self.blocks.register_full(seq.table, seq.token_ids, end)
        return ScheduledChunk(seq.seq_id, tuple(seq.token_ids[c:c + k]) + tuple(draft), c, tuple(slots.tolist()),
                              tuple(seq.table.ids[:self.blocks.blocks_for(end)]),
                              logits=c + k == seq.num_tokens, num_draft=len(draft))

    # -- reporting -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return dict(running=len(self.running), waiting=len(self.waiting), steps=self.num_steps,
                    preemptions=self.num_preemptions, prefill_tokens=self.prefill_tokens,
                    decode_tokens=self.decode_tokens, draft_tokens=self.draft_tokens,
                    accepted_draft_tokens=self.accepted_draft_tokens, **self.blocks.stats())

    def __str__(self) -> str:
        return (f"Scheduler(running {[s.seq_id for s in self.running]}, waiting {[s.seq_id for s in self.waiting]}, "
                f"blocks {self.blocks.num_used}/{self.blocks.num_blocks} used)")


def _accepted(ch: ScheduledChunk, x) -> list[int]:
    """commit()'s entry for one logits chunk as a list of ids: one id for an ordinary chunk (an int,
    or a list of one); for a verification chunk 1 to k + 1 ids, all but the last equal to its drafts."""
    ids = [int(t) for t in x] if isinstance(x, (list, tuple, np.ndarray)) else [int(x)]
    n = len(ids)
    if not 1 <= n <= 1 + ch.num_draft or ids[:-1] != list(ch.draft[:n - 1]):
        raise ValueError(f"seq {ch.seq_id}: {ids} is not an accepted prefix of the drafts {list(ch.draft)} "
                         f"followed by one token")
    return ids
