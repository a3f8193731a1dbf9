"""Generation through the real Scheduler + BlockManager and a model's forward_step, with or without
speculative decoding: the loop a runner runs (the Engine's is being rewritten; this is the reference
for wiring engine/speculative.py into it).

    out = generate(model, prompts, n, speculator=None, params=SamplingParams(temperature=0.0))
    out.tokens[i]      the n generated ids of prompts[i] (end-of-text ignored, as batch_drive does)
    out.rows[i]        without speculation: the (n, vocab) logits each token was chosen from
    out.sched, out.passes    the scheduler (its stats()) and the number of forward steps

truncated_gguf(src, dst, n_layers) writes a copy of a GGUF with only its first n_layers layers: a draft
model with the target's exact vocabulary and a different (worse) distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aircupy.engine.blocks import BlockManager
from aircupy.engine.params import SamplingParams
from aircupy.engine.sampler import Sampler
from aircupy.engine.scheduler import Scheduler
from aircupy.gguf.reader import GGUFFile
from tests.helpers.gguf_build import T, write_gguf

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Generation:
    tokens: list[list[int]]
    rows: list[list[np.ndarray]]
    sched: Scheduler
    passes: int


def generate(model, prompts, n: int, speculator=None, params=GREEDY, num_blocks: int = 128,
             block_size: int = 16, max_batched_tokens: int = 256, max_num_seqs: int = 16,
             seeds=None, on_step=None) -> Generation:
    """Every prompt through one Scheduler to exactly n tokens each. seeds: one sampling seed per
    prompt (params.seed otherwise). on_step(step, logits) sees each step."""
    V = model.config.vocab_size
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens)
    kv = model.new_kv_pool(num_blocks, block_size)
    seqs = [sched.add(p) for p in prompts]
    samplers = {s.seq_id: Sampler(params if seeds is None else params.with_overrides(seed=seeds[i]), V,
                                  prompt_ids=s.prompt_ids) for i, s in enumerate(seqs)}
    rows: dict[int, list[np.ndarray]] = {s.seq_id: [] for s in seqs}
    passes = 0
    while sched.has_unfinished():
        if speculator is not None:
            for s in sched.running:
                if s.num_unfed == 1:
                    d = speculator.draft(s.seq_id, s.token_ids, samplers[s.seq_id], limit=n - len(s.output_ids) - 1)
                    sched.set_draft(s.seq_id, d.tokens)
        step = sched.schedule()
        logits = model.forward_step(step.arrays(), kv)
        passes += 1
        assert logits.shape == (len(step.logits_rows), V)
        if on_step is not None:
            on_step(step, logits)
        ids, finish = [], []
        for ch, sl in zip(step.logits_chunks, step.logits_slices):
            seq, smp = sched.get(ch.seq_id), samplers[ch.seq_id]
            if speculator is not None:
                acc = speculator.verify(ch.seq_id, ch.draft, logits[sl], smp)
            else:
                acc = [smp.sample(logits[sl][0])]
                rows[ch.seq_id].append(logits[sl][0])
            room = n - len(seq.output_ids)
            acc = acc[:room]
            ids.append(acc if ch.num_draft else acc[0])
            finish.append("length" if len(acc) == room else None)
        for s in sched.commit(step, ids, finish):
            if speculator is not None:
                speculator.release(s.seq_id)
    assert bm.num_used == 0, "blocks leaked"
    for s in seqs:
        assert s.is_finished and len(s.output_ids) == n, s
    return Generation([list(s.output_ids) for s in seqs], [rows[s.seq_id] for s in seqs], sched, passes)


def min_margin(rows) -> float:
    """Smallest top-1 minus top-2 logit gap over rows, relative to each row's largest |logit|: how far
    a row is from an argmax flip (summation-order noise is ~1e-6 of the scale)."""
    out = np.inf
    for r in rows:
        top = np.partition(r, -2)[-2:]
        out = min(out, float((top[1] - top[0]) / np.abs(r).max()))
    return out


def truncated_gguf(src, dst, n_layers: int):
    """A copy of src keeping layers [0, n_layers) (block_count rewritten); every other tensor and all
    the metadata (the vocabulary above all) as they are."""
    g = GGUFFile(src)
    arch = g.metadata["general.architecture"]
    md = {**g.metadata, f"{arch}.block_count": n_layers}
    keep = []
    for name, t in g.tensors.items():
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_layers:
            continue
        keep.append(T(name, t.ggml_type, t.shape, bytes(t.data)))
    out = write_gguf(dst, metadata=md, tensors=keep)
    g.close()
    return out
