"""A fake model runner over a fake paged KV cache, and the bookkeeping checks, for scheduler tests.

    runner = FakeRunner(block_manager)      # runs a Step: writes (token, position) into each KV slot,
    ids = runner.run(step)                  # reads each logits row's history back through its block table
    rows = runner.rows(step)                # every logits row's next token, a list per logits chunk
    drive(sched, runner)                    # schedule/run/commit until done, limits asserted per step

next_token() is the fake model: a deterministic function of a sequence's whole history, so a
sequence run through the scheduler must generate exactly what alone() gives; a wrong slot, a stale or
shared-then-overwritten block, or a lost token changes the output. Sequence.params is the sequence's
max_tokens here.
"""
from __future__ import annotations

import zlib
from collections import Counter

import numpy as np

from aircupy.engine.blocks import BlockManager
from aircupy.engine.scheduler import Scheduler, Status

EOS = 0


def next_token(history) -> int:
    """The fake model: a deterministic function of the whole token history (0 acts as end of text)."""
    return zlib.crc32(np.asarray(history, dtype=np.int32).tobytes()) % 50


class FakeRunner:
    """Runs a Step like a paged-attention model: each row writes (token, position) into its KV slot,
    then a logits row reads positions [0, end) back through the chunk's block table and asks
    next_token() of what it read. Blocks are never cleared, as on a GPU: stale KV shows."""

    def __init__(self, bm: BlockManager):
        self.B = bm.block_size
        self.tok = np.full(bm.num_blocks * bm.block_size, -1, np.int64)
        self.pos = np.full(bm.num_blocks * bm.block_size, -1, np.int64)

    def run(self, step) -> list[int]:
        """The next token of every logits chunk (its last row): a step without drafts."""
        return [r[-1] for r in self.rows(step)]

    def rows(self, step) -> list[list[int]]:
        """For each logits chunk, the fake model's next token after each of its logits rows (one row,
        or 1 + k for a verification chunk: row j reads positions [0, end - k + j))."""
        out = []
        for ch in step.chunks:                      # in step order: a later chunk may read these writes
            assert ch.num_tokens >= 1, "a model needs a token to run to give logits"
            assert len(ch.slots) == ch.num_tokens and len(ch.block_table) * self.B >= ch.end
            for t, p, s in zip(ch.token_ids, ch.positions, ch.slots):
                assert s == ch.block_table[p // self.B] * self.B + p % self.B
                self.tok[s], self.pos[s] = t, p
            if ch.logits:
                slots = [ch.block_table[p // self.B] * self.B + p % self.B for p in range(ch.end)]
                assert self.pos[slots].tolist() == list(range(ch.end)), "KV read at the wrong position"
                out.append([next_token(self.tok[slots[:n]]) for n in range(ch.end - ch.num_draft, ch.end + 1)])
        return out


def alone(prompt, max_tokens, max_model_len):
    """What a sequence generates when it runs by itself, and why it stops."""
    toks = list(prompt)
    while True:
        t = next_token(toks)
        toks.append(t)
        if t == EOS:
            return toks[len(prompt):], "stop"
        if len(toks) - len(prompt) >= max_tokens or len(toks) >= max_model_len:
            return toks[len(prompt):], "length"


def reasons(sched, step, ids):
    """The caller's finishing decisions: end of text, or max_tokens (Sequence.params)."""
    out = []
    for ch, t in zip(step.logits_chunks, ids):
        seq = sched.get(ch.seq_id)
        n_out = 0 if seq is None else len(seq.output_ids) + 1
        out.append("stop" if t == EOS else "length" if seq is not None and n_out >= seq.params else None)
    return out


def drive(sched, runner, max_steps=100_000, check=None):
    """Run until every sequence finished; return the steps. Asserts the per-step limits."""
    steps = []
    while sched.has_unfinished():
        assert len(steps) < max_steps, "the scheduler does not progress"
        step = sched.schedule()
        assert step, "an empty step while sequences wait: a hang"
        assert step.num_tokens <= sched.max_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len({c.seq_id for c in step.chunks}) == len(step.chunks)
        ids = runner.run(step)
        sched.commit(step, ids, reasons(sched, step, ids))
        steps.append(step)
        if check:
            check(sched)
    return steps


def check_invariants(sched: Scheduler):
    """Refcounts equal the tables holding a block; free + used == total; a block in two tables is a
    registered full block both have computed, at the same index over equal tokens; queue order."""
    bm, B = sched.blocks, sched.blocks.block_size
    bm.check()
    live = list(sched.running) + list(sched.waiting)
    assert all(not s.table.ids for s in sched.waiting)
    assert all(s.status is Status.RUNNING for s in sched.running)
    assert all(s.status is Status.WAITING for s in sched.waiting)
    held = Counter(b for s in live for b in s.table.ids)
    assert all(bm.ref_count(b) == held[b] for b in range(bm.num_blocks))
    assert bm.num_used == len(held) and bm.num_free + bm.num_used == bm.num_blocks
    where = {}
    for s in sched.running:
        assert s.num_computed_tokens < s.num_tokens and len(s.table) * B >= s.num_computed_tokens
        if s.num_unfed > 1:
            assert len(s.table) * B >= s.num_tokens
        for i, b in enumerate(s.table.ids):
            if held[b] > 1:
                assert bm.is_registered(b) and (i + 1) * B <= s.num_computed_tokens
                if b in where:
                    j, toks = where[b]
                    assert j == i and toks[:(i + 1) * B] == s.token_ids[:(i + 1) * B]
                where[b] = (i, s.token_ids)
    arrivals = [s.arrival for s in sched.running] + [s.arrival for s in sched.waiting]
    assert arrivals == sorted(arrivals)
    assert len(sched.running) <= sched.max_num_seqs


def disturb(sched, rng, seqs, aborted: set, rollback_p: float, finish_p: float = 0.02) -> None:
    """A random client action after a step of a fuzz run: abort a sequence (recorded in `aborted`)
    with probability finish_p, else roll a running one back into its generated tokens with
    probability rollback_p - finish_p."""
    r = rng.random()
    if r < finish_p:
        victim = rng.choice(seqs)
        if sched.finish(victim.seq_id) is not None:
            aborted.add(victim.seq_id)
    elif r < rollback_p and sched.running:
        s = rng.choice(sched.running)
        sched.rollback(s.seq_id, rng.randrange(s.num_prompt_tokens, s.num_tokens + 1))


def assert_as_alone(seqs, aborted: set, cap: int) -> None:
    """Every sequence not aborted produced exactly what it produces alone."""
    for s in seqs:
        if s.seq_id not in aborted:
            assert (s.output_ids, s.finish_reason) == alone(s.prompt_ids, s.params, cap), s
