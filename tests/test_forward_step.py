"""NumpyModel.forward_step (a continuous-batching step over a paged KV pool) against forward() run on
each sequence alone, on tiny models of every architecture and on the real SmolLM2 and Gemma3.

The batched runs drive the real Scheduler + BlockManager with a dozen prompts of different lengths, some
sharing a prefix (prefix-cache hits, and a chunk reading blocks an earlier chunk of the same step
writes), a small token budget (prompts split over steps, steps mixing decode rows and prefill chunks)
and few blocks (preemption, then recomputation). Every sequence must generate exactly its solo greedy
tokens, and every logits row must equal the solo run's within REL: |a - b| / max|b| per row <= 1e-4.
The two paths share the layer code; what differs is summation order (matmuls over N rows rather than
T, attention over gathered keys), which moves float32 logits by ~1e-6 of their scale here (tiny models
~1e-6, SmolLM2 3e-6), and up to 5e-5 at one ill-conditioned Gemma3 position, where forward()'s own
prefill and token-by-token runs differ by as much. The prompt seeds keep every greedy choice's top-2
margin above 3e-4 of the scale (printed with -s), 100x what rounding moves, so another BLAS cannot
flip a token.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.engine.step import ScheduledChunk, Step
from aircupy.gguf.reader import GGUFFile
from aircupy.reference.model import NumpyModel
from tests.helpers.batch_drive import batched_greedy, forced_logits, solo_greedy
from tests.helpers.tiny_models import TINY, write_tiny_model

REL = 1e-4
N_TOKENS = 32


def _load(path):
    g = GGUFFile(path)
    return NumpyModel(g, ModelConfig.from_gguf(g))


def _with_config(model, **changes):
    """The same weights under a changed config (a shallow copy: nothing is reloaded)."""
    m = copy.copy(model)
    m.config = replace(model.config, **changes)
    return m


def _rel(a, b) -> float:
    return float((np.abs(a - b) / np.abs(b).max(axis=-1, keepdims=True)).max())


def _prompts(rng, lo, hi, n=12, shared=20, max_len=60, first=None):
    """n prompts of 1..max_len ids in [lo, hi); every third starts with the same `shared` ids, and so
    do the first two, with 1 or 2 ids after it: both fit the first step, where the second reads the
    prefix blocks the first one's chunk writes."""
    prefix = rng.integers(lo, hi, size=shared).tolist()
    out = []
    for i in range(n):
        tail = rng.integers(lo, hi, size=int(rng.integers(1, 3 if i < 2 else max_len - shared))).tolist()
        if i < 2 or i % 3 == 0:
            out.append(prefix + tail)
        else:
            out.append(rng.integers(lo, hi, size=int(rng.integers(1, max_len))).tolist())
    if first is not None:
        out = [[first] + p[:-1] if len(p) > 1 else [first] for p in out]
    return out


class Coverage:
    """What a batched run went through, watched step by step (on_step of batched_greedy)."""

    def __init__(self, block_size):
        self.B = block_size
        self.chunked = self.mixed = self.same_step_reads = 0

    def __call__(self, step, logits):
        decode = [c for c in step.chunks if c.num_tokens == 1]
        prefill = [c for c in step.chunks if c.num_tokens > 1]
        self.mixed += bool(decode and prefill)
        self.chunked += sum(not c.logits for c in prefill)
        written = set()
        for c in step.chunks:
            read = set(c.block_table[:c.start // self.B])
            self.same_step_reads += bool(read & written)
            written |= {s // self.B for s in c.slots}


def _check_batched(model, prompts, num_blocks, block_size, budget, max_num_seqs, one_pass=False):
    """Batched greedy runs against solo ones: step by step through forward(), or with one_pass (the
    real models, to halve the test's time) one forward() prefill of each batched result whose every
    argmax must be the next token (forced_logits: the same solo greedy run, in one pass)."""
    cov = Coverage(block_size)
    out, sched = batched_greedy(model, prompts, N_TOKENS, num_blocks=num_blocks, block_size=block_size,
                                max_batched_tokens=budget, max_num_seqs=max_num_seqs, on_step=cov)
    worst, margin = 0.0, np.inf
    for i, (p, (toks, logits)) in enumerate(zip(prompts, out)):
        if one_pass:
            solo_logits = forced_logits(model, p, toks)
            solo_toks = [int(t) for t in solo_logits.argmax(axis=1)]
        else:
            solo_toks, solo_logits = solo_greedy(model, p, N_TOKENS)
        assert toks == solo_toks, f"prompt {i} (len {len(p)}): batched {toks} != solo {solo_toks}"
        worst = max(worst, _rel(logits, solo_logits))
        top2 = np.sort(solo_logits, axis=-1)[:, -2:]
        margin = min(margin, float(((top2[:, 1] - top2[:, 0]) / np.abs(solo_logits).max(axis=-1)).min()))
    print(f"worst relative logit difference {worst:.1e}, smallest greedy top-2 margin {margin:.1e}")
    assert worst <= REL, worst
    st = sched.stats()
    assert st["preemptions"] > 0 and st["prefix_hit_tokens"] > 0, st
    assert cov.chunked and cov.mixed and cov.same_step_reads, vars(cov)


# -- tiny models of every architecture ---------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(TINY) + ["gemma3_softcaps"])
def tiny(request, tmp_path_factory):
    name = "gemma3" if request.param == "gemma3_softcaps" else request.param
    model = _load(write_tiny_model(tmp_path_factory.mktemp("tiny") / f"{name}.gguf", TINY[name]))
    if request.param == "gemma3_softcaps":   # gemma2-style caps on the tiny gemma3 weights
        model = _with_config(model, attn_softcap=5.0, final_softcap=10.0)
    return request.param, model


def test_scheduler_and_forward_step_match_solo_runs(tiny):
    name, model = tiny
    prompts = _prompts(np.random.default_rng(10), 3, model.config.vocab_size, shared=12, max_len=40)
    _check_batched(model, prompts, num_blocks=28, block_size=4, budget=16, max_num_seqs=6)


def _chunk(seq_id, ids, start, table, B, logits=True):
    pos = np.arange(start, start + len(ids))
    slots = np.asarray(table)[pos // B] * B + pos % B
    return ScheduledChunk(seq_id, tuple(ids), start, tuple(slots.tolist()), tuple(table), logits)


def test_hand_built_step_against_forward_on_contiguous_caches(tiny):
    """Step 1 prefills A (9 tokens) and B's first 5; step 2 runs A's decode row, B's chunk [5, 12) and
    C, which shares A's first 8 tokens and reads the blocks A wrote in step 1, plus its own [8, 10) in
    a block a chunk before it in the same step never touches. Blocks are out of order on purpose."""
    _, model = tiny
    B, V = 4, model.config.vocab_size
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, V, size=10).tolist(), rng.integers(3, V, size=12).tolist()
    c = a[:8] + rng.integers(3, V, size=2).tolist()
    ta, tb, tc = [6, 1, 9], [4, 0, 8], [6, 1, 3]
    kv = model.new_kv_pool(10, B)
    s1 = Step((_chunk(0, a[:9], 0, ta, B), _chunk(1, b[:5], 0, tb[:2], B, logits=True)))
    got1 = model.forward_step(s1.arrays(), kv)
    s2 = Step((_chunk(0, a[9:], 9, ta, B), _chunk(1, b[5:], 5, tb, B), _chunk(2, c[8:], 8, tc, B)))
    got2 = model.forward_step(s2.arrays(), kv)
    assert got1.shape == (2, V) and got2.shape == (3, V) and got2.dtype == np.float32

    def solo(ids, cuts):
        cache, out = model.new_cache(16), []
        for lo, hi in zip(cuts, cuts[1:]):
            out.append(model.forward(np.array(ids[lo:hi], np.int32), np.arange(lo, hi, dtype=np.int32), cache)[0])
        return out

    (a9, a10), (b5, b12), c10 = solo(a, [0, 9, 10]), solo(b, [0, 5, 12]), solo(c, [0, 10])[0]
    for got, want in ((got1[0], a9), (got1[1], b5), (got2[0], a10), (got2[1], b12), (got2[2], c10)):
        assert _rel(got[None], want[None]) <= REL


def test_forward_step_logits_rows_only_and_errors(tiny):
    _, model = tiny
    B, ids = 4, [5, 6, 7, 8, 9, 10]
    kv = model.new_kv_pool(4, B)
    step = Step((_chunk(0, ids, 0, [2, 3], B),))
    want = model.forward(np.array(ids, np.int32), np.arange(6, dtype=np.int32), model.new_cache(8), all_logits=True)
    arrays = step.arrays()
    arrays["logits_rows"] = np.array([5, 1, 3], np.int32)            # any rows, in the order asked
    got = model.forward_step(arrays, kv)
    assert _rel(got, want[[5, 1, 3]]) <= REL
    first = Step((_chunk(0, ids[:3], 0, [2, 3], B, logits=False),))   # a prompt's first chunk: no logits
    assert model.forward_step(first.arrays(), model.new_kv_pool(4, B)).shape == (0, model.config.vocab_size)
    from aircupy.errors import InvalidParameterError
    bad = dict(step.arrays(), slot_mapping=step.arrays()["slot_mapping"][::-1].copy())
    with pytest.raises(InvalidParameterError, match="slot_mapping"):
        model.forward_step(bad, kv)
    with pytest.raises(InvalidParameterError, match="kv"):
        model.forward_step(step.arrays(), model.new_kv_pool(4, B).__class__(1, 4, B, 1, 2, 2))


# -- the real models ----------------------------------------------------------------------------------

def test_smollm2_batched_greedy_equals_solo(smollm2_path):
    model = _load(smollm2_path)
    prompts = _prompts(np.random.default_rng(3), 100, 20000, first=1)
    _check_batched(model, prompts, num_blocks=24, block_size=16, budget=40, max_num_seqs=8, one_pass=True)


def test_gemma3_batched_greedy_equals_solo(gemma3_path):
    """Gemma3's real weights with its sliding window shrunk from 512 to 16 positions (same code path,
    both runs use the changed config), so that these short sequences cross it on the local layers."""
    model = _with_config(_load(gemma3_path), sliding_window=16)
    prompts = _prompts(np.random.default_rng(1), 300, 200000, first=2)
    _check_batched(model, prompts, num_blocks=24, block_size=16, budget=40, max_num_seqs=8, one_pass=True)
