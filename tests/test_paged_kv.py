"""PagedKVCache (writes at slot ids, gathers through block tables, sizing arithmetic), the step-array
checks of reference/batch.py, and ops.attention_rows against ops.attention one row at a time."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aircupy.errors import InvalidParameterError
from aircupy.reference import ops as ref
from aircupy.reference.batch import StepArrays
from aircupy.reference.paged_kv import PagedKVCache


def _pool(num_blocks=6, B=4, L=2, H=3, D=8, Dv=5):
    return PagedKVCache(L, num_blocks, B, H, D, Dv)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_gather_reads_back_what_was_written_at_each_position(data):
    """A sequence whose positions live in shuffled blocks: gather(lo, hi) and gather_rows(slots) return
    exactly the rows written at those positions' slots, in position order."""
    kv = _pool()
    B, rng = kv.block_size, np.random.default_rng(data.draw(st.integers(0, 2**16)))
    n = data.draw(st.integers(1, kv.num_slots))
    table = rng.permutation(kv.num_blocks)[:-(-n // B)]
    pos = np.arange(n)
    slots = table[pos // B] * B + pos % B
    k = rng.standard_normal((n, 3, 8)).astype(np.float32)
    v = rng.standard_normal((n, 3, 5)).astype(np.float32)
    kv.write(1, slots, k, v)
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    padded = np.concatenate([table, [-1, -1]])              # Step.arrays() pads tables with -1
    keys, values = kv.gather(1, padded, lo, hi)
    assert keys.shape == (3, hi - lo, 8) and values.shape == (3, hi - lo, 5)
    np.testing.assert_array_equal(keys, k[lo:hi].transpose(1, 0, 2))
    np.testing.assert_array_equal(values, v[lo:hi].transpose(1, 0, 2))
    rk, rv = kv.gather_rows(1, slots[None, lo:hi])
    np.testing.assert_array_equal(rk[0], keys)
    np.testing.assert_array_equal(rv[0], values)
    assert not kv.k[0].any()                                 # other layers untouched


def test_sizing_arithmetic():
    # SmolLM2's shape: 30 layers, 3 kv heads of 64: 16-token block = 30*16*3*128*4 bytes
    per_block = PagedKVCache.bytes_for(30, 1, 16, 3, 64, 64)
    assert per_block == 737_280
    assert PagedKVCache.bytes_for(30, 100, 16, 3, 64, 64) == 100 * per_block
    assert PagedKVCache.blocks_for_budget(100 * per_block + per_block - 1, 30, 16, 3, 64, 64) == 100
    assert PagedKVCache.blocks_for_budget(per_block - 1, 30, 16, 3, 64, 64) == 0
    kv = PagedKVCache(30, 8, 16, 3, 64, 64)
    assert kv.nbytes == 8 * per_block and kv.num_slots == 128
    assert kv.k[0].shape == (128, 3, 64) and kv.k[0].dtype == np.float32
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(30, 0, 16, 3, 64, 64)


def _arrays(**over):
    """Two chunks, block size 4: a decode row at position 5 (blocks [2, 0]) and a prefill [0, 3) (block [1])."""
    a = dict(input_ids=[7, 8, 9, 10], positions=[5, 0, 1, 2], slot_mapping=[1, 4, 5, 6],
             query_start=[0, 1, 4], context_lens=[6, 3], block_tables=[[2, 0], [1, -1]], logits_rows=[0, 3])
    a.update(over)
    return {k: np.asarray(x, np.int32) for k, x in a.items()}


def test_step_arrays_accepts_a_valid_step():
    s = StepArrays.check(_arrays(), _pool(), vocab_size=20)
    assert s.num_chunks == 2 and s.positions.dtype == np.int64
    with pytest.raises(InvalidParameterError, match="logits_rows"):
        StepArrays.check({k: v for k, v in _arrays().items() if k != "logits_rows"}, _pool(), 20)


@pytest.mark.parametrize("change, name", [
    (dict(input_ids=[7, 8, 9, 20]), "input_ids"),
    (dict(query_start=[0, 0, 4]), "query_start"),
    (dict(query_start=[0, 1, 3]), "query_start"),
    (dict(context_lens=[6, 2]), "context_lens"),
    (dict(positions=[4, 0, 1, 2]), "positions"),
    (dict(slot_mapping=[1, 4, 5, 7]), "slot_mapping"),
    (dict(block_tables=[[2, -1], [1, -1]]), "block_tables"),
    (dict(block_tables=[[2, 6], [1, -1]], slot_mapping=[25, 4, 5, 6]), "block_tables"),
    (dict(block_tables=[[2], [1]]), "block_tables"),
    (dict(logits_rows=[4]), "logits_rows"),
])
def test_step_arrays_reject_inconsistent_steps(change, name):
    with pytest.raises(InvalidParameterError, match=name):
        StepArrays.check(_arrays(**change), _pool(), vocab_size=20)


@pytest.mark.parametrize("window, cap", [(None, None), (3, None), (None, 2.0), (4, 1.5)])
def test_attention_rows_equals_attention_row_by_row(window, cap):
    """Rows of different context lengths, padded to the longest (k_pos -1, garbage keys): each equals
    a one-query attention() over its own valid keys."""
    rng = np.random.default_rng(0)
    n, H, Hkv, D, Dv, S = 4, 6, 2, 8, 5, 9
    lens = np.array([1, 9, 4, 6])
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((n, Hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((n, Hkv, S, Dv)).astype(np.float32)
    q_pos = np.array([10, 20, 3, 7])
    k_pos = np.full((n, S), -1)
    for r, m in enumerate(lens):
        k_pos[r, :m] = np.arange(q_pos[r] - m + 1, q_pos[r] + 1)
    got = ref.attention_rows(q, k, v, q_pos, k_pos, 0.3, window=window, softcap_value=cap)
    assert got.shape == (n, H * Dv) and got.dtype == np.float32
    for r, m in enumerate(lens):
        want = ref.attention(q[r:r + 1], k[r][:, :m], v[r][:, :m], q_pos[r:r + 1], k_pos[r, :m], 0.3,
                             window=window, softcap_value=cap)
        np.testing.assert_allclose(got[r:r + 1], want, rtol=1e-5, atol=1e-6)
