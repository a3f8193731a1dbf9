"""GPU tier of graph-replayed prefill: replays give the eager pass's logits bit for bit.

Each model runs a fixed series of sessions on its start-up (pooled) cache twice: once with eager
prefill (prefill_graphs detached), once graphed. The series reuses chunk lengths so that graphs are
captured (a full chunk after its first run, other lengths after their second), replayed at a later
position (a third chunk of the same T), evicted from a 3-slot LRU and captured again; every session
ends with greedy decode steps, which must continue identically. forward_sample's prefill path too.
The counts asserted follow cuda_prefill's policy (tests/test_prefill_graphs.py checks it on the CPU).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
ROWS = 16      # prefill chunk (full_rows): a 40-token prompt is chunks of 16, 16, 8
N_CTX = 96
SLOTS = 3
CASES = [("llama3-8b", "Q4_0", 2), ("qwen2-0.5b", "Q8_0", 2), ("gemma3-270m", "Q4_K", 6)]
# (chunk lengths fed as separate forward calls, all_logits). T <= 8 runs the matvec/split-KV path.
SESSIONS = [([40], True),          # T=16 eager + captured, replayed; T=8 eager
            ([12, 12, 12], False),  # T=12 eager, eager + captured, replayed at positions 24..35
            ([40], False),         # T=16 replays; T=8 captured now (LRU: 12, 16, 8)
            ([9, 5, 9], True),     # T=9 captured: evicts 12
            ([12, 30], False),     # 12 again: captured anew (evicts 16); 30 = 16 (again) + 14
            ([3, 3, 3], True),     # small T: decode-kernel attention inside a graph
            ([16, 12, 3], False)]  # all three replayed
STEPS = 3


@pytest.fixture(scope="module")
def lib():
    from aircupy.cuda.kernels import KernelLibrary
    lib = KernelLibrary()
    lib.warmup()
    return lib


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0]}-{p[1]}")
def model(request, tmp_path_factory, lib):
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions
    from aircupy.synth import synth_model
    preset, qtype, n_layers = request.param
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    rep = synth_model(tmp_path_factory.mktemp("pg") / "m.gguf", preset, qtype, n_layers=n_layers,
                      overrides=over, seed=3, logit_std=8.0)
    g = GGUFFile(rep.path)
    m = CudaModel(g, ModelConfig.from_gguf(g), N_CTX, lib=lib,
                  options=CudaOptions(prefill_rows=ROWS, prefill_graph_slots=SLOTS))
    yield m
    g.close()


@contextlib.contextmanager
def eager_prefill(m):
    pg, m.prefill_graphs = m.prefill_graphs, None
    try:
        yield
    finally:
        m.prefill_graphs = pg


def _session(m, cache, lengths, all_logits, seed):
    """Prefill chunks of `lengths` (one forward each), then STEPS greedy steps: (logits list, tokens)."""
    rng = np.random.default_rng(seed)
    cache.truncate(0)
    out = []
    for n in lengths:
        ids = rng.integers(0, m.config.vocab_size, n).astype(np.int32)
        pos = np.arange(cache.length, cache.length + n, dtype=np.int32)
        out.append(m.forward(ids, pos, cache, all_logits=all_logits))
    toks = []
    for _ in range(STEPS):
        toks.append(int(out[-1][-1].argmax()))
        out.append(m.forward(np.array([toks[-1]], np.int32), np.array([cache.length], np.int32), cache))
    return out, toks


def test_replayed_prefill_equals_eager_bit_for_bit(model):
    m = model
    pg = m.prefill_graphs
    assert pg is not None
    cache = m.new_cache(N_CTX)
    assert cache.pooled
    held = []
    for k, (lengths, all_logits) in enumerate(SESSIONS):
        with eager_prefill(m):
            ref, ref_toks = _session(m, cache, lengths, all_logits, seed=k)
        got, toks = _session(m, cache, lengths, all_logits, seed=k)
        assert pg.fallback_reason is None, pg.fallback_reason
        for i, (a, b) in enumerate(zip(ref, got)):
            assert a.shape == b.shape
            assert np.array_equal(a, b), (f"session {k} output {i}: max |diff| "
                                          f"{np.abs(a - b).max():.3g}")
        assert toks == ref_toks
        held.append(pg.graphs.keys())
    assert 16 in held[0] and 12 in held[1] and 8 in held[2]
    assert 9 in held[3] and 12 not in held[3]            # evicted (least recently used)
    assert 12 in held[4] and 3 in held[5]                # captured again / small T
    assert (pg.captures, pg.replays, pg.evictions) == (7, 8, 4)
    print(f"PREFILL {m.allocation_report()}")


def test_forward_sample_prefill_is_graphed_and_equal(model):
    from aircupy.engine.params import SamplingParams
    m = model
    cache = m.new_cache(N_CTX)
    prompt = np.random.default_rng(9).integers(0, m.config.vocab_size, 21).astype(np.int32)
    pos = np.arange(21, dtype=np.int32)

    def sample():
        cache.truncate(0)
        return m.forward_sample(prompt, pos, cache, m.new_sampler(SamplingParams(temperature=0.0)))

    with eager_prefill(m):
        ref = sample()
        cache.truncate(0)
        ref_logits = m.forward(prompt, pos, cache)
    r0 = m.prefill_graphs.replays
    got = [sample() for _ in range(3)]                   # chunks 16 + 5, captured or replayed
    assert got == [ref] * 3 and ref == int(ref_logits[0].argmax())
    assert m.prefill_graphs.replays - r0 >= 3


def test_graph_capture_allocates_nothing_in_the_pool(model):
    import cupy as cp
    m = model
    cache = m.new_cache(N_CTX)
    ids = np.arange(1, 12, dtype=np.int32)
    mp = cp.get_default_memory_pool()

    def run():
        cache.truncate(0)
        return m.forward(ids, np.arange(11, dtype=np.int32), cache)

    run()                                                # T=11: eager (first use)
    cp.cuda.Device().synchronize()
    free0, used0 = cp.cuda.runtime.memGetInfo()[0], mp.used_bytes()
    a = run()                                            # eager, captured, checked
    b = run()                                            # replayed
    cp.cuda.Device().synchronize()
    free1 = cp.cuda.runtime.memGetInfo()[0]
    assert 11 in m.prefill_graphs.graphs and np.array_equal(a, b)
    assert mp.used_bytes() == used0
    print(f"MEM one prefill graph (T=11, {m.config.n_layers} layers): "
          f"{(free0 - free1) / 2**20:.2f} MiB of device memory outside the pool")
    assert free0 - free1 <= 16 << 20
