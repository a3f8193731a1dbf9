"""Continuous batching through the Engine's API (engine/runner.py) on the real models, numpy backend.

Every request here runs through the runner thread: many at once from threads or generate_batch. The
reference for "alone" is forced_logits (tests/helpers/batch_drive.py): the single-sequence forward()
over prompt + generated tokens in one pass, whose every argmax must be the next generated token (then
greedy decoding alone produces exactly those tokens). Logprobs (the raw log-softmax of each row the
engine sampled from) must agree with that pass within LOGPROB_TOL: the batched and solo paths differ
only in summation order (~1e-6 of the logits' scale, test_forward_step.py).
"""
from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from aircupy.engine.batching import BatchLimits, KVPlan, plan_kv
from aircupy.engine.params import SamplingParams
from aircupy.errors import ContextLengthError, InvalidParameterError
from tests.helpers.batch_drive import forced_logits
from tests.helpers.engines import numpy_engine, with_batching

N_TOKENS = 32
LOGPROB_TOL = 1e-3
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return numpy_engine(smollm2_path)


def wait_for(cond, timeout=120.0):
    """Poll until cond() holds; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def idle(engine) -> dict:
    wait_for(lambda: engine.stats()["busy"] == 0)
    return engine.stats()


def prompts(seed, lo, hi, n=12, shared=20, max_len=60, first=None):
    """n token-id prompts of 1..max_len ids in [lo, hi), every third (and the first two) starting with
    the same `shared` ids: prefix-cache hits, and a chunk reading blocks another chunk of its step
    writes. `first`: the BOS to start each with."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(lo, hi, size=shared).tolist()
    out = []
    for i in range(n):
        if i < 2 or i % 3 == 0:
            out.append(prefix + rng.integers(lo, hi, size=int(rng.integers(1, 3 if i < 2 else max_len - shared))).tolist())
        else:
            out.append(rng.integers(lo, hi, size=int(rng.integers(1, max_len))).tolist())
    return [[first] + p for p in out] if first is not None else out


def check_alone(model, prompt, result):
    """result (a GenerationResult with logprobs) is what greedy decoding of prompt alone gives."""
    solo = forced_logits(model, prompt, result.token_ids).astype(np.float64)
    assert [int(t) for t in solo.argmax(axis=1)] == result.token_ids
    lse = solo.max(axis=1) + np.log(np.exp(solo - solo.max(axis=1, keepdims=True)).sum(axis=1))
    want = solo[np.arange(len(solo)), result.token_ids] - lse
    got = np.array([lp.logprob for lp in result.logprobs])
    assert np.abs(got - want).max() <= LOGPROB_TOL, np.abs(got - want).max()


# -- a sequence in any batch generates what it generates alone -----------------------------------------

def test_smollm2_greedy_from_threads_equals_alone(smol):
    ps = prompts(3, 100, 20000, first=1)
    before = idle(smol)
    results = [None] * len(ps)

    def work(i):
        results[i] = smol.generate(ps[i], GREEDY)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = idle(smol)
    for p, r in zip(ps, results):
        assert len(r.token_ids) == N_TOKENS and r.finish_reason == "length"
        check_alone(smol.model, p, r)
    # they ran together: far fewer forward steps than tokens, and the shared prefix was found cached
    assert after["steps"] - before["steps"] < len(ps) * N_TOKENS / 2
    assert after["prompt_cached_tokens"] > before["prompt_cached_tokens"]
    assert after["kv_blocks_used"] == 0


def test_gemma3_generate_batch_equals_alone(gemma3_path):
    gemma = numpy_engine(gemma3_path)
    ps = prompts(1, 300, 200000, first=2)
    results = gemma.generate_batch(ps, GREEDY)
    for p, r in zip(ps, results):
        assert r.prompt_token_ids == p and len(r.token_ids) == N_TOKENS
        check_alone(gemma.model, p, r)
    assert idle(gemma)["kv_blocks_used"] == 0


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(smol):
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=10, seed=99, ignore_eos=True)
    alone = smol.generate("Once upon a time", p)
    mixed = smol.generate_batch(["The sky is", "Once upon a time", "1, 2, 3,", "Once upon a time"],
                                [p.with_overrides(seed=1), p, GREEDY.with_overrides(max_tokens=12),
                                 p.with_overrides(seed=100)])
    assert mixed[1].token_ids == alone.token_ids and mixed[1].text == alone.text
    assert mixed[3].token_ids != alone.token_ids           # the seed, not the prompt, decides


# -- cancellation, a full pool, failures ---------------------------------------------------------------

def test_a_storm_of_cancels_returns_every_block_and_the_engine_serves_on(smol):
    texts = ["Tell me a long story about a dragon", "List every prime number", "Hello there, how are",
             "The history of Rome in detail: first"]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    before = idle(smol)

    def storm(k):
        for j in range(4):
            s = smol.stream(texts[(k + j) % len(texts)], params)
            for _ in range(j):             # close before any token, or after 1..3 tokens
                next(s)
            if j == 3:
                del s                      # dropped without close(): its collection aborts it
                gc.collect()
            else:
                s.close()
    threads = [threading.Thread(target=storm, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = idle(smol)
    assert after["kv_blocks_used"] == 0 and after["running"] == after["waiting"] == 0
    assert after["cancelled_requests"] - before["cancelled_requests"] == 16
    assert after["completion_tokens"] - before["completion_tokens"] < 16 * 10    # far from 16 x 60
    r = smol.generate(texts[0], GREEDY.with_overrides(max_tokens=4))
    check_alone(smol.model, r.prompt_token_ids, r)


def test_a_sink_that_raises_aborts_only_its_request(smol):
    """submit()'s sink runs on the runner thread; one that raises (its consumer is gone) has its
    request aborted, and the request beside it runs on."""
    def gone(item):
        raise RuntimeError("the consumer's event loop is closed")
    before = idle(smol)
    bad = smol.submit("Tell me a long story", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True), gone)
    good = smol.generate("Hello there", GREEDY.with_overrides(max_tokens=4))
    after = idle(smol)
    assert bad.done.is_set() and len(bad.token_ids) < 50 and bad.finish_reason is None
    assert len(good.token_ids) == 4 and after["kv_blocks_used"] == 0
    assert after["cancelled_requests"] - before["cancelled_requests"] == 1


def test_a_tiny_kv_pool_makes_requests_wait_and_all_finish(smol):
    """Six blocks of 16 tokens for four sequences of 52 to 55 tokens (4 blocks each): admission waits
    for blocks, and decode preempts the newest (recomputed later); every request still finishes with
    its solo tokens."""
    tiny = with_batching(smol, n_ctx=96, kv_cache_tokens=96, max_num_seqs=4)
    try:
        rng = np.random.default_rng(7)
        ps = [[1] + rng.integers(100, 20000, size=35 + i).tolist() for i in range(4)]   # 3 blocks each
        ps[1][:20] = ps[0][:20]                                                         # and a shared one
        params = GREEDY.with_overrides(max_tokens=16)
        results = tiny.generate_batch(ps, params)
        st = idle(tiny)
        for p, r in zip(ps, results):
            assert r.finish_reason == "length" and len(r.token_ids) == 16
            check_alone(smol.model, p, r)
        assert st["kv_blocks_total"] == 6 and st["preemptions"] > 0 and st["kv_blocks_used"] == 0
        assert st["failed_requests"] == 0
    finally:
        tiny.close_runner()


class FailingModel:
    """The numpy model whose forward_step_sample raises on call number `fail_on` (counting from 1)."""

    def __init__(self, model, fail_on):
        self.m, self.fail_on, self.calls = model, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.m, name)

    def forward_step_sample(self, arrays, kv, samplers):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated device failure")
        return self.m.forward_step_sample(arrays, kv, samplers)


def test_a_failing_forward_fails_the_running_requests_and_the_engine_serves_on(smol):
    """One sequence at a time: the running request gets the error; the waiting one is kept and
    finishes with its solo tokens; later requests run as usual."""
    eng = with_batching(smol, model=FailingModel(smol.model, fail_on=3), max_num_seqs=1)
    try:
        params = GREEDY.with_overrides(max_tokens=6)
        a = eng.stream("The first request", params)
        b = eng.stream("The second request", params)
        with pytest.raises(RuntimeError, match="simulated device failure"):
            list(a)
        rb = b.result()
        check_alone(smol.model, rb.prompt_token_ids, rb)
        rc = eng.generate("A later request", params)
        check_alone(smol.model, rc.prompt_token_ids, rc)
        st = idle(eng)
        assert st["forward_errors"] == 1 and st["failed_requests"] == 1 and st["kv_blocks_used"] == 0
    finally:
        eng.close_runner()


class ShuttleModel:
    """The numpy model reporting the KV shuttle's spec: one block of n_ctx tokens, one sequence."""

    def __init__(self, model, n_ctx):
        self.m, self.n_ctx, self.max_chunks = model, n_ctx, 0

    def __getattr__(self, name):
        return getattr(self.m, name)

    def kv_spec(self):
        return dict(block_size=self.n_ctx, num_blocks=1, max_num_seqs=1)

    def forward_step_sample(self, arrays, kv, samplers):
        self.max_chunks = max(self.max_chunks, len(arrays["context_lens"]))
        return self.m.forward_step_sample(arrays, kv, samplers)


def test_the_kv_shuttle_spec_runs_one_sequence_at_a_time(smol):
    model = ShuttleModel(smol.model, 100)
    eng = with_batching(smol, model=model, n_ctx=100)
    try:
        assert (eng.kv_plan.num_blocks, eng.kv_plan.block_size, eng.kv_plan.manager_block_size,
                eng.kv_plan.max_num_seqs) == (1, 100, 128, 1)
        params = GREEDY.with_overrides(max_tokens=5)
        rs = eng.generate_batch(["One request", "and another one at the same time"], params)
        for r in rs:
            check_alone(smol.model, r.prompt_token_ids, r)
        assert model.max_chunks == 1
        with pytest.raises(ContextLengthError):
            eng.generate([5] * 100, params)
        long = eng.generate([5] * 90, params.with_overrides(max_tokens=50))
        assert long.finish_reason == "length" and len(long.token_ids) == 10    # filled the 100 positions
    finally:
        eng.close_runner()


# -- limits ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, param", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=8, max_batched_tokens=4), "max_batched_tokens"),
    (dict(kv_cache_tokens=100), "kv_cache_tokens"),
    (dict(max_num_seqs=True), "max_num_seqs"),
])
def test_bad_limits_name_the_parameter(kw, param):
    args = dict(max_num_seqs=64, max_batched_tokens=None, kv_cache_tokens=None) | kw
    with pytest.raises(InvalidParameterError) as e:
        BatchLimits.check(n_ctx=256, **args)
    assert e.value.param == param


def test_engine_checks_its_limits_before_loading(smollm2_path):
    from aircupy import Engine
    with pytest.raises(InvalidParameterError) as e:
        Engine(smollm2_path, backend="numpy", n_ctx=128, max_num_seqs=16, max_batched_tokens=8)
    assert e.value.param == "max_batched_tokens"


def test_kv_plans():
    lim = BatchLimits.check(64, None, None, 256)
    assert lim.max_batched_tokens == 512 and lim.load_kwargs() == dict(max_num_seqs=64, max_batched_tokens=512,
                                                                      kv_tokens=None)
    per_token = 46080                                  # SmolLM2: 30 layers x 3 heads x (64 + 64) x 4 B
    numpy_spec = dict(block_size=16, num_blocks=None, max_num_seqs=None)
    # the default: 64 contexts when a quarter of RAM holds them, else that quarter, at least one context
    assert plan_kv(numpy_spec, lim, 256, per_token, 2**40) == KVPlan(1024, 16, 16, 64, 512)
    assert plan_kv(numpy_spec, lim, 256, per_token, 2**30).tokens == -(-(2**28 // per_token) // 16) * 16
    assert plan_kv(numpy_spec, lim, 256, per_token, 2**20).tokens == 256
    asked = BatchLimits.check(64, None, 1000, 256)
    assert plan_kv(numpy_spec, asked, 256, per_token, None).num_blocks == 63          # rounded up to blocks
    with pytest.raises(InvalidParameterError, match="kv_cache_tokens"):
        plan_kv(numpy_spec, asked, 256, per_token, 2**20)                           # more than the RAM
    cuda = plan_kv(dict(block_size=16, num_blocks=4096, max_num_seqs=32), lim, 256, per_token, None)
    assert (cuda.num_blocks, cuda.max_num_seqs) == (4096, 32)                       # the model's plan wins
    with pytest.raises(InvalidParameterError, match="fewer than n_ctx"):
        plan_kv(dict(block_size=16, num_blocks=8, max_num_seqs=None), lim, 256, per_token, None)
    with pytest.raises(ValueError, match="power of two"):
        plan_kv(dict(block_size=24, num_blocks=16, max_num_seqs=None), lim, 256, per_token, None)
