"""Scheduler support for speculative decoding: verification chunks (a decode row plus k drafts, every row
a logits row), their arrays, acceptance and rollback of the rejected rows' KV, the blocks they return,
prefix-cache registration of accepted tokens only, drafts cut by the budget, the free blocks and
max_model_len, preemption and finish with drafts in flight; and a random storm in which every sequence
must still generate exactly what it generates alone, with no block leaked.

The fake model (tests/helpers/fake_runner.py) reads each row's history back through the block table, so
a verification row at a wrong slot, or a stale rejected token's KV left where the next token is read,
changes the output."""
from __future__ import annotations

import random

import pytest

from aircupy.engine.blocks import BlockManager
from aircupy.engine.scheduler import Scheduler, Status
from aircupy.reference.batch import StepArrays
from tests.helpers.fake_runner import (
    EOS,
    FakeRunner,
    alone,
    assert_as_alone,
    check_invariants,
    disturb,
    next_token,
)


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_batched_tokens=32, max_model_len=None):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, max_batched_tokens, max_model_len), FakeRunner(bm)


def truth(tokens, k):
    """The fake model's next k tokens after `tokens` (what a perfect drafter proposes)."""
    toks = list(tokens)
    for _ in range(k):
        toks.append(next_token(toks))
    return toks[len(tokens):]


def greedy_accept(draft, rows):
    """Longest prefix of the draft that agrees with the rows, then the row's own next token."""
    m = 0
    while m < len(draft) and draft[m] == rows[m]:
        m += 1
    return list(draft[:m]) + [rows[m]]


def step_once(sched, runner, check_arrays=True):
    """Schedule, run (greedy acceptance of every verification chunk), commit with the fake model's stop
    rules (EOS ends a sequence, cutting the accepted tokens there; Sequence.params is max_tokens)."""
    step = sched.schedule()
    if check_arrays:
        StepArrays.check(step.arrays(), _Pool(sched.blocks), 50)   # positions, slots, rows consistent
    ids, finish = [], []
    for ch, rows in zip(step.logits_chunks, runner.rows(step)):
        acc = greedy_accept(ch.draft, rows)
        seq = sched.get(ch.seq_id)
        reason = None
        if EOS in acc:
            acc, reason = acc[:acc.index(EOS) + 1], "stop"
        if seq is not None and len(seq.output_ids) + len(acc) >= seq.params:
            acc = acc[:seq.params - len(seq.output_ids)]
            reason = reason if reason and acc[-1] == EOS else "length"
        ids.append(acc if ch.num_draft else acc[0])
        finish.append(reason)
    sched.commit(step, ids, finish)
    return step


class _Pool:
    """What StepArrays.check asks of a KV pool."""

    def __init__(self, bm):
        self.block_size, self.num_blocks = bm.block_size, bm.num_blocks


def decode_one(sched, runner, prompt, max_tokens=40, steps=1):
    seq = sched.add(prompt, params=max_tokens)
    for _ in range(steps):
        step_once(sched, runner)
    assert seq.status is Status.RUNNING and seq.num_unfed == 1
    return seq


def test_verification_chunk_rows_arrays_and_acceptance():
    sched, runner = make(block_size=4)
    seq = decode_one(sched, runner, [1, 2, 3, 4, 5, 6], steps=2)           # 8 tokens, KV of 7
    good = truth(seq.token_ids, 3)
    assert sched.set_draft(seq.seq_id, good[:2] + [(good[2] + 1) % 50]) == 3
    step = sched.schedule()
    (ch,) = step.chunks
    assert (ch.start, ch.num_tokens, ch.num_draft, ch.logits, ch.num_logits) == (7, 4, 3, True, 4)
    assert ch.token_ids == (seq.token_ids[7],) + ch.draft and "verify" in str(ch)
    arr = step.arrays()
    assert arr["positions"].tolist() == [7, 8, 9, 10] and arr["logits_rows"].tolist() == [0, 1, 2, 3]
    t = seq.table.ids
    assert arr["slot_mapping"].tolist() == [t[1] * 4 + 3, t[2] * 4, t[2] * 4 + 1, t[2] * 4 + 2]
    assert step.logits_slices == (slice(0, 4),) and arr["context_lens"].tolist() == [11]
    rows = runner.rows(step)[0]
    assert rows[:2] == good[:2] and rows[2] == good[2]
    sched.commit(step, [good[:2] + [rows[2]]])
    # two drafts accepted and the target's own third token: KV of the old last token and the two drafts
    assert seq.num_tokens == 11 and seq.num_computed_tokens == 10 and len(seq.table) == 3
    assert seq.output_ids == alone([1, 2, 3, 4, 5, 6], 5, 256)[0]
    assert sched.stats()["draft_tokens"] == 3 and sched.stats()["accepted_draft_tokens"] == 2
    check_invariants(sched)
    step_once(sched, runner)                                               # the next row reads all of it
    assert seq.output_ids == alone([1, 2, 3, 4, 5, 6], 6, 256)[0]


def test_rejected_rows_return_their_blocks_and_are_not_cached():
    sched, runner = make(num_blocks=16, block_size=4)
    seq = decode_one(sched, runner, [7, 8, 9], steps=1)                    # 4 tokens, KV of 3: 1 block
    used = sched.blocks.num_used
    bad = [(t + 1) % 50 for t in truth(seq.token_ids, 9)]                  # every draft wrong
    sched.set_draft(seq.seq_id, bad)
    step = sched.schedule()
    assert step.chunks[0].num_draft == 9 and sched.blocks.num_used == used + 3  # positions up to 12
    draft_blocks = seq.table.ids[1:]
    sched.commit(step, [runner.rows(step)[0][0]])                          # nothing accepted
    assert seq.num_tokens == 5 and seq.num_computed_tokens == 4
    assert len(seq.table) == 2 and sched.blocks.num_used == used + 1       # the next token's block stays
    assert not any(sched.blocks.is_registered(b) for b in draft_blocks)
    assert seq.table.num_registered == 1 and sched.blocks.is_registered(seq.table.ids[0])
    check_invariants(sched)
    while sched.has_unfinished():
        step_once(sched, runner)
    assert seq.output_ids == alone([7, 8, 9], 40, 256)[0]
    assert sched.blocks.num_used == 0


def test_only_blocks_of_accepted_tokens_reach_the_prefix_cache():
    sched, runner = make(num_blocks=32, block_size=4)
    seq = decode_one(sched, runner, [3, 1, 4], steps=1)                    # 4 tokens, KV of 3
    good = truth(seq.token_ids, 8)
    sched.set_draft(seq.seq_id, good[:5] + [(t + 1) % 50 for t in good[5:]])
    step = sched.schedule()
    assert seq.table.num_registered == 1                                   # block 0: positions 0..3, no draft
    assert greedy_accept(step.chunks[0].draft, runner.rows(step)[0]) == good[:6]
    sched.commit(step, [good[:6]])                                         # 5 accepted + the 6th token
    assert seq.num_computed_tokens == 9 and seq.num_tokens == 10
    reg = [sched.blocks.is_registered(b) for b in seq.table.ids]
    assert reg == [True, True, False] and seq.table.num_registered == 2
    other = sched.add(seq.token_ids[:9] + [42], params=2)                  # shares the accepted prefix
    step_once(sched, runner)
    assert other.num_cached_tokens == 8
    check_invariants(sched)


def test_drafts_are_cut_by_the_budget_oldest_first():
    sched, runner = make(max_batched_tokens=8, max_num_seqs=3)
    seqs = [sched.add([10 + i, 20 + i], params=40) for i in range(3)]
    step_once(sched, runner)
    for s in seqs:
        assert sched.set_draft(s.seq_id, truth(s.token_ids, 4)) == 4
    step = sched.schedule()
    # 3 decode rows first, then 5 tokens of drafts: 4 for the oldest, 1 for the next, none for the last
    assert [c.num_draft for c in step.chunks] == [4, 1, 0] and step.num_tokens == 8
    assert [c.num_logits for c in step.logits_chunks] == [5, 2, 1]
    assert step.logits_slices == (slice(0, 5), slice(5, 7), slice(7, 8))
    assert all(not s.draft for s in seqs)                                  # a draft is for one step
    rows = runner.rows(step)
    sched.commit(step, [greedy_accept(c.draft, r) if c.num_draft else r[0] for c, r in zip(step.chunks, rows)])
    for s in seqs:
        assert s.output_ids == alone(s.prompt_ids, len(s.output_ids), 256)[0]
    check_invariants(sched)


def test_drafts_never_preempt_and_take_only_free_blocks():
    sched, runner = make(num_blocks=5, block_size=4, max_batched_tokens=64)
    a = sched.add([1, 2, 3, 4, 5, 6], params=40)                           # 2 blocks
    b = sched.add([7, 8, 9, 10, 11, 12], params=40)                        # 2 blocks
    step_once(sched, runner)
    assert sched.blocks.num_free == 1
    sched.set_draft(a.seq_id, truth(a.token_ids, 8))
    sched.set_draft(b.seq_id, truth(b.token_ids, 8))
    step = sched.schedule()
    # a's drafts fill its second block (position 7) and the one free block (8..11): 5 drafts; b's only
    # the rest of its own second block (position 7): 1 draft
    assert [c.num_draft for c in step.chunks] == [5, 1]
    assert not step.preempted and sched.num_preemptions == 0 and sched.blocks.num_free == 0
    sched.commit(step, [greedy_accept(c.draft, r) if c.num_draft else r[0]
                        for c, r in zip(step.chunks, runner.rows(step))])
    check_invariants(sched)
    while sched.has_unfinished():
        step_once(sched, runner)
    for s in (a, b):                                                       # max_model_len: the 20 slots
        assert (s.output_ids, s.finish_reason) == alone(s.prompt_ids, 40, 20)


def test_preemption_and_rollback_drop_a_draft():
    sched, runner = make(num_blocks=4, block_size=4, max_batched_tokens=16)
    old = sched.add([1, 2, 3, 4, 5, 6, 7, 8], params=30)                   # 2 blocks
    new = sched.add([9, 10, 11, 12, 13, 14, 15, 16], params=30)            # 2 blocks
    step_once(sched, runner)
    sched.set_draft(new.seq_id, truth(new.token_ids, 3))
    assert new.draft
    step = sched.schedule()                                                # old's row needs a 3rd block
    assert step.preempted == (new.seq_id,) and new.status is Status.WAITING and new.draft == []
    sched.commit(step, runner.run(step))
    assert sched.set_draft(new.seq_id, [1, 2]) == 0                        # waiting: nothing kept
    sched.set_draft(old.seq_id, [5, 5])
    sched.rollback(old.seq_id, old.num_tokens - 1)
    assert old.draft == []
    while sched.has_unfinished():
        step_once(sched, runner)
        check_invariants(sched)
    for s in (old, new):
        assert (s.output_ids, s.finish_reason) == alone(s.prompt_ids, 30, 16)


def test_finish_with_a_draft_in_flight_returns_every_block():
    sched, runner = make(num_blocks=16, block_size=4)
    a = decode_one(sched, runner, [1, 2, 3, 4, 5], steps=1)
    sched.set_draft(a.seq_id, truth(a.token_ids, 10))
    step = sched.schedule()
    assert step.chunks[0].num_draft == 10
    sched.finish(a.seq_id, "abort")                                        # a client gone mid-step
    assert sched.blocks.num_used == 0
    sched.commit(step, [runner.rows(step)[0][:11]])                        # skipped
    assert not sched.has_unfinished() and sched.blocks.num_used == 0
    sched.blocks.check()


def test_drafts_respect_max_model_len_and_commit_checks_the_prefix():
    sched, runner = make(max_model_len=12)
    s = decode_one(sched, runner, [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=100, steps=1)   # 9 tokens
    assert sched.set_draft(s.seq_id, [1, 2, 3, 4, 5]) == 2                 # 9 + 2 + 1 = 12
    step = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.set_draft(s.seq_id, [1])                                     # a step is in flight
    d = list(step.chunks[0].draft)
    with pytest.raises(ValueError):
        sched.commit(step, [[(d[0] + 1) % 50, 3]])                         # not a prefix of the drafts
    with pytest.raises(ValueError):
        sched.commit(step, [d + [1, 2]])                                   # more than k + 1 ids
    with pytest.raises(ValueError):
        sched.commit(step, [[]])
    sched.commit(step, [d + [9]])                                          # the step was still in flight
    assert s.num_tokens == 12 and s.is_finished and s.finish_reason == "length"
    assert sched.blocks.num_used == 0


@pytest.mark.parametrize("seed", range(6))
def test_storm_with_drafts_generates_what_each_sequence_generates_alone(seed):
    """Random prompts over shared stems, tight blocks (preemption), small budgets, aborts, rollbacks, and
    drafts of random length that are right up to a random point: every sequence not aborted must
    generate exactly its solo tokens, and every block must come back."""
    rng = random.Random(seed)
    B = rng.choice([1, 2, 4, 8])
    num_blocks = rng.choice([24, 32, 40]) // B
    cap = num_blocks * B
    bm = BlockManager(num_blocks, B)
    budget = rng.choice([6, 12, 32])
    sched = Scheduler(bm, max_num_seqs=rng.choice([3, 4, 6]), max_batched_tokens=budget, max_model_len=cap)
    runner = FakeRunner(bm)
    stems = [[rng.randrange(1, 50) for _ in range(cap)] for _ in range(3)]
    seqs, aborted = [], set()
    for _ in range(24):
        prompt = rng.choice(stems)[:rng.randrange(1, cap // 2)] + [rng.randrange(1, 50)] * rng.randrange(2)
        seqs.append(sched.add(prompt[:cap - 1], params=rng.randrange(1, 40)))
    steps = 0
    while sched.has_unfinished():
        for s in list(sched.running):
            if rng.random() < 0.8:
                d = truth(s.token_ids, rng.randrange(0, 9))
                cut = rng.randrange(0, len(d) + 1)
                d = d[:cut] + [(t + 1 + rng.randrange(48)) % 50 for t in d[cut:]]
                sched.set_draft(s.seq_id, d)
        step = step_once(sched, runner)
        steps += 1
        assert step.num_tokens <= budget and len(sched.running) <= sched.max_num_seqs
        disturb(sched, rng, seqs, aborted, rollback_p=0.07)
        check_invariants(sched)
    assert_as_alone(seqs, aborted, cap)
    assert bm.num_used == 0 and bm.num_free == num_blocks
    st = sched.stats()
    assert st["draft_tokens"] > 0 and 0 < st["accepted_draft_tokens"] < st["draft_tokens"]
    assert st["preemptions"] > 0 and steps < sum(s.num_tokens for s in seqs)
