"""Greedy generation two ways, for the batched-forward tests and benchmark: alone through forward()
on a contiguous cache, and together through the real Scheduler + BlockManager and forward_step().

    toks, logits = solo_greedy(model, prompt, n)                 # n tokens, (n, vocab) logits
    logits = forced_logits(model, prompt, toks)                  # the same, in one prefill
    out, sched = batched_greedy(model, prompts, n, num_blocks=.., block_size=.., max_batched_tokens=..)
    out[i] = (toks, logits) of prompts[i]; sched.stats() has the preemptions and prefix-cache hits

Both ignore end-of-text (every sequence generates exactly n tokens), so the two runs line up position by
position: logits[t] is the distribution the t-th generated token was taken from.
"""
from __future__ import annotations

import numpy as np

from aircupy.engine.blocks import BlockManager
from aircupy.engine.scheduler import Scheduler


def solo_greedy(model, prompt, n: int) -> tuple[list[int], np.ndarray]:
    cache = model.new_cache(len(prompt) + n)
    ids = np.asarray(prompt, np.int32)
    logits = model.forward(ids, np.arange(len(ids), dtype=np.int32), cache)[-1]
    toks, rows = [], []
    for _ in range(n):
        toks.append(int(np.argmax(logits)))
        rows.append(logits)
        if len(toks) == n:
            break
        logits = model.forward(np.array([toks[-1]], np.int32), np.array([cache.length], np.int32), cache)[-1]
    return toks, np.array(rows)


def forced_logits(model, prompt, toks) -> np.ndarray:
    """The solo run's logits (n, vocab) in one forward() pass over prompt + toks[:-1] (all_logits):
    when every row's argmax is the next of toks, greedy decoding alone produces exactly toks (by
    induction over the steps), at the cost of one prefill instead of n decode steps."""
    ids = np.asarray(list(prompt) + list(toks[:-1]), np.int32)
    logits = model.forward(ids, np.arange(len(ids), dtype=np.int32), model.new_cache(len(ids)), all_logits=True)
    return logits[len(prompt) - 1:]


def batched_greedy(model, prompts, n: int, num_blocks: int, block_size: int, max_batched_tokens: int,
                   max_num_seqs: int = 64, on_step=None):
    """Every prompt through one Scheduler; on_step(step, logits) sees each step (checks, timing)."""
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens)
    kv = model.new_kv_pool(num_blocks, block_size)
    seqs = [sched.add(p) for p in prompts]
    rows: dict[int, list[np.ndarray]] = {s.seq_id: [] for s in seqs}
    while sched.has_unfinished():
        step = sched.schedule()
        logits = model.forward_step(step.arrays(), kv)
        assert logits.shape == (len(step.logits_rows), model.config.vocab_size) and logits.dtype == np.float32
        if on_step is not None:
            on_step(step, logits)
        ids = [int(np.argmax(r)) for r in logits]
        for ch, r in zip(step.logits_chunks, logits):
            rows[ch.seq_id].append(r)
        finish = []
        for ch in step.logits_chunks:
            seq = sched.get(ch.seq_id)
            finish.append("length" if len(seq.output_ids) + 1 >= n else None)
        sched.commit(step, ids, finish)
    out = []
    for s in seqs:
        assert s.is_finished and len(s.output_ids) == n, s
        out.append((list(s.output_ids), np.array(rows[s.seq_id])))
    return out, sched
