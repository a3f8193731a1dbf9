"""GPU tier: the Engine's runner (engine/runner.py) over the CUDA model on the real SmolLM2.

- Requests run together through Engine.generate_batch and from threads: each sequence's tokens equal
  what the same engine generates for it alone, wherever the solo run's top-2 margin exceeds what the
  batched kernels' other summation order can move (a batch's rows take other GEMM paths than one row:
  tests/gpu/test_batch_steps.py bounds the logits within LOGIT_RTOL of their RMS); the logprobs agree
  within the same tolerance.
- Seeded sampling on the device draws the same tokens alone and in a batch (each sequence's sampler
  counts its own tokens).
- A storm of closed streams returns every KV block.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

N_TOKENS = 24
LOGPROB_TOL = 0.05        # nats: the batched vs single-row logits, ~1e-3 relative (fp16 KV and GEMM operands)
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3, 4,",
           "The three primary colours are", "def fibonacci(n):", "Water boils at",
           "The largest planet of the solar system is", "In 1969, the first man on the moon"]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from aircupy import Engine
    e = Engine(smollm2_path, backend="cuda", n_ctx=512, max_num_seqs=16)
    yield e
    e.close()


def _greedy(logprobs=2, **kw):
    """Greedy; with logprobs (top-2) the rows are sampled on the host from logits, without on the device."""
    from aircupy.engine.params import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=logprobs, **kw)


def _agree(solo, batched):
    """Tokens equal up to the first divergence, a divergence only where the solo run's top-2 margin is
    within twice the tolerance (the batched token its runner-up); logprobs close over the common part
    (when the batched run has them)."""
    n = 0
    while n < len(solo.token_ids) and solo.token_ids[n] == batched.token_ids[n]:
        n += 1
    if batched.logprobs is not None:
        for a, b in zip(solo.logprobs[:n], batched.logprobs[:n]):
            assert abs(a.logprob - b.logprob) <= LOGPROB_TOL
    if n < len(solo.token_ids):
        (_, _, lp0), (id1, _, lp1) = solo.logprobs[n].top[:2]
        assert batched.token_ids[n] == id1 and lp0 - lp1 <= 2 * LOGPROB_TOL, (n, solo.token_ids, batched.token_ids)


def test_generate_batch_and_threads_equal_each_request_alone(engine):
    alone = [engine.generate(p, _greedy()) for p in PROMPTS]
    batched = engine.generate_batch(PROMPTS, _greedy())
    on_device = engine.generate_batch(PROMPTS, _greedy(logprobs=None))     # the device samplers' argmax
    for a, b, d in zip(alone, batched, on_device):
        assert len(b.token_ids) == len(d.token_ids) == N_TOKENS
        _agree(a, b)
        _agree(a, d)
    got = [None] * len(PROMPTS)

    def work(i):
        got[i] = engine.generate(PROMPTS[i], _greedy())
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, got):
        _agree(a, b)
    st = engine.stats()
    assert st["kv_blocks_used"] == 0 and st["running"] == 0


def test_seeded_device_sampling_is_the_same_in_a_batch(engine):
    from aircupy.engine.params import SamplingParams
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=12, seed=7, ignore_eos=True)
    alone = engine.generate(PROMPTS[1], p)
    mixed = engine.generate_batch(PROMPTS[:4], [p.with_overrides(seed=1), p, p.with_overrides(seed=3),
                                                _greedy()])
    assert mixed[1].token_ids == alone.token_ids


def test_closed_streams_return_every_block(engine):
    from aircupy.engine.params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    streams = [engine.stream(p, params) for p in PROMPTS * 4]
    for i, s in enumerate(streams):
        for _ in range(i % 3):
            next(s)
        s.close()
    st = engine.stats()
    assert st["kv_blocks_used"] == 0 and st["running"] == st["waiting"] == 0
    assert np.isfinite(engine.generate(PROMPTS[0], _greedy()).logprobs[0].logprob)
