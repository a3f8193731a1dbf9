"""GPU tier: the paged KV layout (rope_kv_store at slots, decode and prefill attention through block
tables, take_rows) against numpy, and the CUDA model's batch steps against its single-sequence path
and the numpy model's batch steps on the real SmolLM2.

The numpy twin of the paged layout: position p of a sequence lives in block table[p // bs] at offset
p % bs, and the pool per layer is (num_blocks, Hkv, bs, hd); gathering a sequence's blocks gives the
(Hkv, S, hd) cache reference/ops.attention takes.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.reference import ops as R
from tests.gpu.kernel_fixtures import poison, rel_err

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from aircupy.cuda import ops  # noqa: E402
from aircupy.cuda.kernels import KernelLibrary  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


def _paged(rng, num_blocks, hkv, bs, hd):
    """Random fp16 pools (num_blocks, Hkv, bs, hd)."""
    k = rng.standard_normal((num_blocks, hkv, bs, hd)).astype(np.float16)
    v = rng.standard_normal((num_blocks, hkv, bs, hd)).astype(np.float16)
    return k, v


def _gather(pool, table, n):
    """(Hkv, n, hd) of the positions [0, n) of the sequence whose blocks are `table`."""
    nb = -(-n // pool.shape[2])
    g = pool[np.asarray(table[:nb])]                       # (nb, Hkv, bs, hd)
    return g.transpose(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])[:, :n]


def _tables(rng, num_blocks, n_seqs, max_blocks):
    perm = rng.permutation(num_blocks)[:n_seqs * max_blocks]
    return perm.reshape(n_seqs, max_blocks).astype(np.int32)


@pytest.mark.parametrize("hd,h,hkv,bs", [(64, 9, 3, 32), (128, 32, 8, 16), (256, 8, 4, 32)])
def test_paged_decode_rows_of_many_sequences(lib, hd, h, hkv, bs):
    """A batch's decode rows, each its own sequence, length and block table, in one launch; windows
    and softcap too. 40 rows: more than the 8 of a single sequence's decode."""
    rng = np.random.default_rng(hd + h)
    n_seqs, max_blocks = 40, 12
    k, v = _paged(rng, n_seqs * max_blocks + 7, hkv, bs, hd)
    tables = _tables(rng, len(k), n_seqs, max_blocks)
    pos = rng.integers(0, max_blocks * bs, n_seqs).astype(np.int32)
    pos[0], pos[1] = 0, max_blocks * bs - 1
    seq = rng.permutation(n_seqs).astype(np.int32)
    q = rng.standard_normal((n_seqs, h, hd)).astype(np.float32)
    for window, softcap in ((0, 0.0), (50, 0.0), (0, 30.0)):
        out = poison(cp, (n_seqs, h * hd))
        scratch = cp.empty(ops.attention_scratch_nbytes(n_seqs, h, hd), dtype=cp.uint8)
        ops.attention(lib, cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(pos), out, scale=0.1,
                      window=window, softcap=softcap, seq=cp.asarray(seq), tables=cp.asarray(tables),
                      kernel="decode", scratch=scratch)
        got = cp.asnumpy(out)
        for t in range(n_seqs):
            n = int(pos[t]) + 1
            kk = _gather(k, tables[seq[t]], n).astype(np.float32)
            vv = _gather(v, tables[seq[t]], n).astype(np.float32)
            want = R.attention(q[t:t + 1], kk, vv, pos[t:t + 1], np.arange(n), 0.1, window or None,
                               softcap or None)
            assert rel_err(got[t:t + 1], want) < 1e-5, (t, window, softcap)


@pytest.mark.parametrize("hd,bs", [(64, 32), (128, 16)])
def test_paged_prefill_chunk_over_cached_blocks(lib, hd, bs):
    """A prompt chunk continuing a cached prefix (prefix caching, chunked prefill): rows at positions
    [start, start + T) attend causally over blocks scattered in the pool."""
    rng = np.random.default_rng(hd)
    h, hkv, start, T = 8, 2, 77, 100
    k, v = _paged(rng, 64, hkv, bs, hd)
    tables = _tables(rng, 64, 3, -(-(start + T) // bs))
    pos = np.arange(start, start + T, dtype=np.int32)
    q = rng.standard_normal((T, h, hd)).astype(np.float32)
    seq = np.full(T, 2, np.int32)
    out = poison(cp, (T, h * hd))
    ops.attention(lib, cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(pos), out, scale=0.125,
                  seq=cp.asarray(seq), tables=cp.asarray(tables), kernel="prefill")
    n = start + T
    want = R.attention(q, _gather(k, tables[2], n).astype(np.float32), _gather(v, tables[2], n).astype(np.float32),
                       pos, np.arange(n), 0.125)
    assert rel_err(cp.asnumpy(out), want) < 3e-3


def test_rope_kv_store_at_slots(lib):
    """K and V land at their slots (block * bs + offset); a negative slot stores nothing."""
    rng = np.random.default_rng(3)
    T, h, hkv, hd, bs, nb = 6, 4, 2, 64, 16, 8
    q = rng.standard_normal((T, h, hd)).astype(np.float32)
    k = rng.standard_normal((T, hkv, hd)).astype(np.float32)
    v = rng.standard_normal((T, hkv, hd)).astype(np.float32)
    pos = np.array([0, 5, 17, 40, 3, 9], np.int32)
    slots = np.array([3, 16 * 5 + 1, 127, 16 * 2 + 15, -1, 50], np.int32)
    ck = cp.zeros((nb, hkv, bs, hd), cp.float16)
    cv = cp.zeros((nb, hkv, bs, hd), cp.float16)
    dk = cp.asarray(k)
    ops.rope_kv_store(lib, cp.asarray(q), dk, cp.asarray(v), ck, cv, cp.asarray(pos), slots=cp.asarray(slots),
                      base=10000.0, mode="norm")
    k_rot = cp.asnumpy(dk)     # rotated in place: what was stored
    want_k = np.zeros((nb, hkv, bs, hd), np.float16)
    want_v = np.zeros((nb, hkv, bs, hd), np.float16)
    for t, s in enumerate(slots):
        if s >= 0:
            want_k[s // bs, :, s % bs] = k_rot[t].astype(np.float16)
            want_v[s // bs, :, s % bs] = v[t].astype(np.float16)
    np.testing.assert_array_equal(cp.asnumpy(ck), want_k)
    np.testing.assert_array_equal(cp.asnumpy(cv), want_v)


def test_take_rows(lib):
    rng = np.random.default_rng(4)
    src = rng.standard_normal((20, 37)).astype(np.float32)
    idx = np.array([19, 0, 5, 5, 7], np.int32)
    out = poison(cp, (5, 37))
    ops.take_rows(lib, cp.asarray(src), cp.asarray(idx), out)
    np.testing.assert_array_equal(cp.asnumpy(out), src[idx])
