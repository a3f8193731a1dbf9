"""GPU tier: continuous-batching steps of the CUDA model (cuda/batch.py) on the real SmolLM2.

- A dozen prompts of different lengths (two sharing a prefix, so the prefix cache hands the second the
  first's blocks) run together through the real Scheduler and forward_step: each sequence's greedy
  tokens equal the same model's single-sequence run (forced_logits: one prefill over its tokens), and
  the step logits agree with it within the fp16-KV tolerance of tests/gpu/test_cuda_model.py.
- Device sampling in a batch (forward_step_sample, the decode graphs): at temperature 0 the ids equal
  the logits' argmax; a seeded sampled sequence draws the same tokens alone and among others.
- A step's ids/logits rows for host-sampled rows come back as logits, the others as ids.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.batch_drive import batched_greedy, forced_logits

pytestmark = pytest.mark.gpu

LOGIT_RTOL = 0.02


@pytest.fixture(scope="module")
def model(smollm2_path):
    from aircupy.config import ModelConfig
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions
    from aircupy.gguf.reader import GGUFFile
    g = GGUFFile(smollm2_path)
    c = ModelConfig.from_gguf(g)
    m = CudaModel(g, c, 512, options=CudaOptions(kv_tokens=4096, max_seqs=16, prefill_rows=256))
    yield m
    m.close()
    g.close()


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    out = [list(rng.integers(10, vocab, n)) for n in (1, 3, 9, 17, 31, 33, 64, 100, 150, 200)]
    shared = list(rng.integers(10, vocab, 70))
    out += [shared + [5, 6, 7], shared + [8]]              # a shared 64-token (two-block) prefix
    return [[int(t) for t in p] for p in out]


def test_batched_greedy_equals_each_sequence_alone(model):
    spec = model.kv_spec()
    assert spec["block_size"] == 32 and spec["num_blocks"] == 128 and spec["max_num_seqs"] == 16
    prompts = _prompts(model.config.vocab_size)
    out, sched = batched_greedy(model, prompts, 32, num_blocks=spec["num_blocks"], block_size=32,
                                max_batched_tokens=256, max_num_seqs=16)
    assert sched.stats()["prefix_hit_tokens"] >= 64     # the shared prompt's two full blocks
    for p, (toks, logits) in zip(prompts, out):
        # the single-sequence path on a fresh cache (the pool's blocks are free again: the scheduler
        # has finished every sequence)
        want = forced_logits(model, p, toks)
        scale = float(np.sqrt(np.mean(want.astype(np.float64) ** 2)))
        assert np.abs(logits - want).max() < LOGIT_RTOL * scale, len(p)
        margin_ok = np.sort(want, axis=1)[:, -1] - np.sort(want, axis=1)[:, -2] > 2 * LOGIT_RTOL * scale
        assert all(int(np.argmax(w)) == t for w, t, ok in zip(want, toks, margin_ok) if ok), len(p)


def _sampled(model, prompts, params, n):
    """n tokens of each prompt through the scheduler with device samplers (forward_step_sample)."""
    from aircupy.engine.blocks import BlockManager
    from aircupy.engine.scheduler import Scheduler
    spec = model.kv_spec()
    sched = Scheduler(BlockManager(spec["num_blocks"], spec["block_size"]), max_num_seqs=16,
                      max_batched_tokens=256)
    kv = model.new_kv_pool(spec["num_blocks"], spec["block_size"])
    seqs = [sched.add(p) for p in prompts]
    samplers = {s.seq_id: model.new_sampler(pp) for s, pp in zip(seqs, params)}
    while sched.has_unfinished():
        step = sched.schedule()
        chunks = step.logits_chunks
        ids, logits = model.forward_step_sample(step.arrays(), kv, [samplers[c.seq_id] for c in chunks])
        assert logits is None and (ids >= 0).all()
        fin = ["length" if len(sched.get(c.seq_id).output_ids) + 1 >= n else None for c in chunks]
        sched.commit(step, [int(i) for i in ids], fin)
    return [list(s.output_ids) for s in seqs]


def test_device_sampling_in_a_batch(model):
    from aircupy.engine.params import SamplingParams
    prompts = _prompts(model.config.vocab_size)[:8]
    greedy = SamplingParams(temperature=0.0)
    got = _sampled(model, prompts, [greedy] * 8, 24)
    want, _ = batched_greedy(model, prompts, 24, num_blocks=128, block_size=32, max_batched_tokens=256,
                             max_num_seqs=16)
    assert got == [t for t, _ in want]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = _sampled(model, prompts[3:4], [seeded], 24)[0]
    others = [SamplingParams(temperature=1.0, seed=i) for i in range(8)]
    others[3] = seeded
    together = _sampled(model, prompts, others, 24)[3]
    assert alone == together
    assert model.batch.graph_steps > 0, model.batch.report()


def test_host_rows_come_back_as_logits(model):
    from aircupy.engine.blocks import BlockManager
    from aircupy.engine.params import SamplingParams
    from aircupy.engine.scheduler import Scheduler
    sched = Scheduler(BlockManager(128, 32), max_num_seqs=16, max_batched_tokens=256)
    kv = model.new_kv_pool(128, 32)
    for p in _prompts(model.config.vocab_size)[:3]:
        sched.add(p)
    step = sched.schedule()
    samplers = [model.new_sampler(SamplingParams(temperature=0.0)), None, model.new_sampler(SamplingParams())]
    ids, logits = model.forward_step_sample(step.arrays(), kv, samplers)
    assert ids[1] == -1 and ids[0] >= 0 and ids[2] >= 0
    assert logits.shape == (3, model.config.vocab_size) and np.isfinite(logits[1]).all()
    assert int(np.argmax(logits[1])) >= 0
    for s in list(sched.running):
        sched.finish(s.seq_id)
