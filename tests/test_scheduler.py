"""Scheduler: chunked prefill, token budget, max_num_seqs, prefix sharing, preemption and resumption,
FIFO admission, rejection, finishing and rollback; a storm of random operations with the block and
queue invariants checked after each; and an end-to-end simulation whose fake model reads its history
from a fake paged KV cache, so a wrong slot, a stale block or a lost token changes the output."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies

from aircupy.engine.blocks import BlockManager
from aircupy.engine.scheduler import RecomputePreemption, Scheduler, Status
from aircupy.errors import ContextLengthError
from tests.helpers.fake_runner import (FakeRunner, alone, assert_as_alone, check_invariants, disturb, drive,
                                       next_token, reasons)


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_batched_tokens=32, max_model_len=None):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, max_batched_tokens, max_model_len), FakeRunner(bm)


def test_rejects_prompts_that_can_never_run():
    sched, _ = make(num_blocks=4, block_size=4)
    with pytest.raises(ContextLengthError, match="KV blocks"):
        sched.add(list(range(17)))
    with pytest.raises(ContextLengthError, match="no room to generate"):
        sched.add(list(range(16)))
    with pytest.raises(ValueError):
        sched.add([])
    assert not sched.has_unfinished() and sched.add(list(range(15))).seq_id == 0
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), max_num_seqs=8, max_batched_tokens=4)


def test_long_prompt_is_split_over_steps_with_logits_at_the_end():
    sched, runner = make(max_batched_tokens=32)
    seq = sched.add(list(range(1, 101)), params=1)
    steps = drive(sched, runner)
    prefill = [c for st in steps for c in st.chunks]
    assert [(c.start, c.num_tokens, c.logits) for c in prefill] == [(0, 32, False), (32, 32, False),
                                                                    (64, 32, False), (96, 4, True)]
    assert sum((c.token_ids for c in prefill), ()) == tuple(range(1, 101))
    assert seq.is_finished and seq.output_ids == alone(range(1, 101), 1, 256)[0]


def test_step_mixes_decode_rows_first_and_a_prefill_chunk():
    sched, runner = make(max_batched_tokens=16)
    a = sched.add([5, 6, 7], params=10)
    st = sched.schedule()
    sched.commit(st, runner.run(st))
    b = sched.add(list(range(1, 41)), params=10)
    st = sched.schedule()
    assert [(c.seq_id, c.num_tokens, c.logits) for c in st.chunks] == [(a.seq_id, 1, True), (b.seq_id, 15, False)]
    assert st.logits_rows == (0,) and st.num_tokens == 16
    arr = st.arrays()
    assert arr["query_start"].tolist() == [0, 1, 16] and arr["context_lens"].tolist() == [4, 15]
    assert arr["positions"].tolist() == [3] + list(range(15))
    assert "decode" in str(st) and "prefill [0, 15)" in str(st)


def test_budget_and_max_num_seqs_are_respected():
    sched, runner = make(num_blocks=256, max_num_seqs=3, max_batched_tokens=8)
    for i in range(10):
        sched.add([i + 1] * (3 + i), params=5)
    steps = drive(sched, runner, check=check_invariants)
    assert max(st.num_tokens for st in steps) == 8
    assert max(len(st.chunks) for st in steps) == 3


def test_same_prompt_shares_blocks_and_recomputes_the_tail():
    sched, runner = make(block_size=4, max_batched_tokens=64)
    prompt = list(range(1, 11))                                  # 2 full blocks + 2 tokens
    seqs = [sched.add(prompt, params=3) for _ in range(3)]       # e.g. n=3 choices
    st = sched.schedule()
    assert [(c.start, c.num_tokens) for c in st.chunks] == [(0, 10), (8, 2), (8, 2)]
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8]
    t0 = seqs[0].block_table
    assert all(s.block_table[:2] == t0[:2] for s in seqs) and len({s.block_table[2] for s in seqs}) == 3
    assert [sched.blocks.ref_count(b) for b in t0] == [3, 3, 1]
    sched.commit(st, runner.run(st))
    check_invariants(sched)


def test_next_turn_reuses_a_finished_sequence():
    sched, runner = make(block_size=4)
    first = sched.add([3, 1, 4, 1, 5, 9, 2], params=6)
    drive(sched, runner)
    history = first.token_ids + [7, 7, 7]
    second = sched.add(history, params=2)
    drive(sched, runner)
    assert second.num_cached_tokens == (len(first.token_ids) - 1) // 4 * 4 > 0
    assert second.output_ids == alone(history, 2, 256)[0]
    assert sched.blocks.num_used == 0


def test_preempts_the_newest_and_resumes_it_to_the_same_output():
    sched, runner = make(num_blocks=6, block_size=4, max_num_seqs=4, max_batched_tokens=16)
    old = sched.add([1, 2, 3, 4, 5, 6, 7], params=12)            # 2 blocks, will need 3 more
    new = sched.add([8, 9, 10, 11, 12, 13, 14], params=12)
    fed = {old.seq_id: [], new.seq_id: []}
    preempted_at = None
    while sched.has_unfinished():
        st = sched.schedule()
        for c in st.chunks:
            fed[c.seq_id].append(c)
        if st.preempted and preempted_at is None:
            preempted_at = len(fed[new.seq_id])
            assert st.preempted == (new.seq_id,) and new.status is Status.WAITING
            assert sched.waiting[0] is new and not new.table.ids and new.num_computed_tokens == 0
            assert [c.seq_id for c in st.chunks] == [old.seq_id]
        ids = runner.run(st)
        sched.commit(st, ids, reasons(sched, st, ids))
        check_invariants(sched)
    assert preempted_at is not None and sched.num_preemptions >= 1 and new.num_preemptions >= 1
    for s, prompt in ((old, range(1, 8)), (new, range(8, 15))):
        assert (s.output_ids, s.finish_reason) == alone(prompt, 12, 24)
    # after resumption the sequence is fed its own tokens again, from its cached prefix on
    resumed = fed[new.seq_id][preempted_at]
    assert resumed.start % 4 == 0 and resumed.token_ids == tuple(new.token_ids[resumed.start:resumed.end])
    # every fed chunk starts where the KV ends: its stream is the sequence's tokens
    for s in (old, new):
        for c in fed[s.seq_id]:
            assert c.token_ids == tuple(s.token_ids[c.start:c.end])


def test_the_preemption_policy_is_replaceable():
    class Recording(RecomputePreemption):
        def __init__(self):
            self.seen = []

        def preempt(self, seq, blocks):
            self.seen.append((seq.seq_id, len(seq.table)))
            super().preempt(seq, blocks)

    policy = Recording()
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_batched_tokens=16, preemption=policy)
    old, new = sched.add([1, 2, 3, 4, 5, 6, 7], params=12), sched.add([8, 9, 10, 11, 12, 13, 14], params=12)
    drive(sched, FakeRunner(bm))
    assert policy.seen and policy.seen[0][0] == new.seq_id and policy.seen[0][1] > 0
    assert len(policy.seen) == sched.num_preemptions and old.is_finished


def test_fifo_admission_does_not_let_a_later_sequence_overtake():
    sched, runner = make(num_blocks=8, block_size=4, max_batched_tokens=64)
    hog = sched.add(list(range(1, 22)), params=2)               # 6 blocks
    big = sched.add(list(range(30, 45)), params=2)               # 4 blocks: does not fit beside hog
    small = sched.add([50, 51], params=2)                        # 1 block: would fit
    steps = drive(sched, runner)
    assert [c.seq_id for c in steps[0].chunks] == [hog.seq_id]  # small would fit, but big is first
    first_seen = list(dict.fromkeys(c.seq_id for st in steps for c in st.chunks))
    assert first_seen == [hog.seq_id, big.seq_id, small.seq_id]


def test_finish_at_any_time_returns_every_block():
    sched, runner = make(block_size=4, max_batched_tokens=8)
    a = sched.add(list(range(1, 30)), params=50)
    b = sched.add([1, 2, 3], params=50)
    st = sched.schedule()                                        # a's first chunk
    assert sched.finish(a.seq_id, "abort") is a and a.finish_reason == "abort"
    assert sched.finish(a.seq_id) is None
    sched.commit(st, runner.run(st))                             # a's chunk is skipped
    assert a.num_computed_tokens == 0 and sched.blocks.num_used == 0
    st = sched.schedule()
    assert [c.seq_id for c in st.chunks] == [b.seq_id]
    sched.commit(st, runner.run(st))
    sched.finish(b.seq_id, "stop")
    assert sched.blocks.num_used == 0 and not sched.has_unfinished()


def test_step_protocol_is_enforced():
    sched, runner = make()
    sched.add([1, 2, 3], params=5)
    st = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()                                         # the step in flight is not committed
    with pytest.raises(RuntimeError):
        sched.rollback(0, 3)
    with pytest.raises(ValueError):
        sched.commit(st, [])                                     # one id per logits row
    sched.commit(st, runner.run(st))
    with pytest.raises(RuntimeError):
        sched.commit(st, runner.run(st))                         # committed twice
    empty = make()[0].schedule()
    arr = empty.arrays()
    assert not empty and arr["query_start"].tolist() == [0] and arr["block_tables"].shape == (0, 0)


def test_abort_all_returns_every_block_and_forgets_the_cache():
    sched, runner = make(block_size=4)
    a = sched.add(list(range(1, 20)), params=5)
    sched.add(list(range(1, 20)), params=5)
    sched.schedule()
    done = sched.abort_all()                                     # e.g. the forward pass raised
    assert {s.seq_id for s in done} == {0, 1} and all(s.finish_reason == "abort" for s in done)
    assert sched.blocks.num_used == 0 and sched.blocks.num_cached == 0 and not sched.has_unfinished()
    b = sched.add(list(range(1, 20)), params=5)
    drive(sched, runner)
    assert b.num_cached_tokens == 0 and a.is_finished


def test_max_model_len_finishes_with_length():
    sched, runner = make(max_model_len=12)
    s = sched.add([1, 2, 3, 4, 5], params=100)
    drive(sched, runner)
    assert s.num_tokens <= 12 and (s.output_ids, s.finish_reason) == alone([1, 2, 3, 4, 5], 100, 12)


def test_rollback_feeds_the_last_kept_token_again():
    sched, runner = make(block_size=4)
    s = sched.add([1, 2, 3, 4, 5, 6], params=100)
    for _ in range(6):
        st = sched.schedule()
        sched.commit(st, runner.run(st))
    assert s.num_tokens == 12 and s.num_computed_tokens == 11
    sched.rollback(s.seq_id, 9)
    assert s.num_tokens == 9 and s.num_computed_tokens == 8 and len(s.table) == 3
    st = sched.schedule()
    assert [(c.start, c.token_ids) for c in st.chunks] == [(8, (s.token_ids[8],))]
    sched.commit(st, runner.run(st))
    assert s.token_ids[9] == next_token(s.token_ids[:9])
    with pytest.raises(ValueError):
        sched.rollback(s.seq_id, 5)                              # into the prompt
    check_invariants(sched)


def test_rollback_into_a_shared_block_recomputes_it():
    sched, runner = make(block_size=4, max_batched_tokens=64)
    a = sched.add([1, 2, 3, 4, 5, 6, 7, 8, 9], params=20)
    for _ in range(5):                                           # 14 tokens, KV of 13: blocks 0..2 full
        st = sched.schedule()
        sched.commit(st, runner.run(st))
    b = sched.add(a.token_ids[:13] + [42], params=20)            # a's prompt and output so far, and more
    st = sched.schedule()
    sched.commit(st, runner.run(st))
    shared = a.table.ids[2]
    assert b.num_cached_tokens == 12 and b.table.ids[2] == shared and sched.blocks.ref_count(shared) == 2
    sched.rollback(a.seq_id, 11)                                 # keep the KV of 10: inside the shared block
    assert a.num_computed_tokens == 8 and a.table.ids[2] != shared and len(a.table) == 3
    assert sched.blocks.ref_count(shared) == 1 and sched.blocks.is_registered(shared)
    check_invariants(sched)
    st = sched.schedule()
    assert [(c.seq_id, c.start, c.num_tokens) for c in st.chunks] == [(b.seq_id, 14, 1), (a.seq_id, 8, 3)]
    sched.commit(st, runner.run(st))
    assert a.token_ids[11] == next_token(a.token_ids[:11])
    drive(sched, runner, check=check_invariants)
    assert (b.output_ids, b.finish_reason) == alone(b.prompt_ids, 20, 256)


@pytest.mark.parametrize("seed", range(3))
def test_random_storm_returns_every_block(seed):
    rng = random.Random(seed)
    bm = BlockManager(rng.choice([12, 20, 40]), rng.choice([1, 2, 4, 8]))
    sched = Scheduler(bm, max_num_seqs=rng.choice([2, 4, 8]), max_batched_tokens=rng.choice([8, 16, 48]))
    runner = FakeRunner(bm)
    stems = [[rng.randrange(1, 50) for _ in range(30)] for _ in range(4)]
    cap = bm.num_blocks * bm.block_size
    step = None
    for _ in range(3000):
        r = rng.random()
        if r < 0.15:
            prompt = rng.choice(stems)[:rng.randrange(1, 30)] + [rng.randrange(1, 50)] * rng.randrange(3)
            sched.add(prompt[:cap - 1], params=rng.randrange(1, 20))
        elif r < 0.22 and sched.has_unfinished():
            victim = rng.choice(list(sched.running) + list(sched.waiting))
            sched.finish(victim.seq_id, rng.choice(["abort", "stop"]))
        elif r < 0.27 and step is None and sched.running:
            s = rng.choice(sched.running)
            sched.rollback(s.seq_id, rng.randrange(s.num_prompt_tokens, s.num_tokens + 1))
        elif step is None:
            step = sched.schedule()
            assert step or not sched.has_unfinished()
            assert step.num_tokens <= sched.max_batched_tokens
        else:
            ids = runner.run(step)
            sched.commit(step, ids, reasons(sched, step, ids))
            step = None
        if step is None:
            check_invariants(sched)
    if step is not None:
        sched.commit(step, runner.run(step))
    drive(sched, runner, check=check_invariants)
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    st = sched.stats()
    assert st["prefix_hit_tokens"] > 0 and st["steps"] > 100


def simulate(block_size, num_blocks, budget, max_num_seqs, seed, n_seqs=40):
    """Many sequences over shared prefixes, aborts and rollbacks between steps, run to the end; every
    sequence not aborted must generate what it generates alone (a rollback regenerates the same
    tokens: the fake model is a function of the history). Returns the scheduler."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size)
    cap = num_blocks * block_size
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_batched_tokens=budget, max_model_len=cap)
    runner = FakeRunner(bm)
    stems = [[rng.randrange(1, 50) for _ in range(cap)] for _ in range(3)]
    seqs, aborted = [], set()
    for _ in range(n_seqs):
        prompt = rng.choice(stems)[:rng.randrange(1, max(2, cap * 2 // 3))] + [rng.randrange(1, 50)] * rng.randrange(2)
        seqs.append(sched.add(prompt[:cap - 1], params=rng.randrange(1, 30)))
    while sched.has_unfinished():
        step = sched.schedule()
        assert step and step.num_tokens <= budget and len(sched.running) <= max_num_seqs
        ids = runner.run(step)
        sched.commit(step, ids, reasons(sched, step, ids))
        disturb(sched, rng, seqs, aborted, rollback_p=0.1)
        check_invariants(sched)
    assert_as_alone(seqs, aborted, cap)
    assert bm.num_used == 0
    return sched


@pytest.mark.parametrize("block_size,num_blocks,budget,seed", [(1, 40, 8, 0), (4, 12, 16, 1), (4, 16, 7, 2),
                                                              (16, 5, 24, 3), (2, 30, 5, 4)])
def test_every_sequence_generates_what_it_generates_alone(block_size, num_blocks, budget, seed):
    """Tight blocks (preemption), a small token budget (chunked prefill), shared prefixes (prefix
    caching), aborts and rollbacks: the property the real engine needs."""
    sched = simulate(block_size, num_blocks, budget, min(6, budget), seed)
    assert sched.num_preemptions > 0 and sched.blocks.hit_tokens > 0


@settings(max_examples=60, deadline=None)
@given(block_size=strategies.sampled_from([1, 2, 4, 8, 16]), num_blocks=strategies.integers(2, 40),
       budget=strategies.integers(1, 40), max_num_seqs=strategies.integers(1, 8),
       seed=strategies.integers(0, 2**16))
def test_any_configuration_matches_solo_runs(block_size, num_blocks, budget, max_num_seqs, seed):
    simulate(block_size, num_blocks, max(budget, max_num_seqs), max_num_seqs, seed, n_seqs=12)
