"""GPU tier: RMSNorm (+ residual fusions), RoPE, GLU, softcap, KV store and attention vs reference/ops.py.

Tolerances (relative L2 error unless stated):
  rms_norm, glu, softcap: fp32 element-wise math -> 1e-6 (tanh/exp ulps)
  rope: angles in double on both sides -> 1e-6
  decode attention: fp32 math over an fp16 cache; the reference gets the same fp16-rounded K/V -> 1e-5
  prefill attention: q and the probabilities also pass through fp16 for the tensor cores -> 3e-3
Contexts cover one token, windows shorter than the context, GQA groups of 1..16, and 5000 keys.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.config import RopeScaling
from aircupy.reference import ops as R
from tests.gpu.kernel_fixtures import poison, rel_err

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from aircupy.cuda.kernels import KernelLibrary  # noqa: E402
from aircupy.cuda.ops import layers as ops_layers  # noqa: E402
from aircupy.cuda import ops  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


@pytest.mark.parametrize("rows,n", [(3, 576), (5, 640), (2, 4096), (48, 64), (1, 5000)])
def test_rms_norm_modes(lib, rows, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
    res = rng.standard_normal((rows, n)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    eps = 1e-6
    out = poison(cp, (rows, n))
    ops.rms_norm(lib, cp.asarray(x), cp.asarray(w), out, eps)
    assert rel_err(cp.asnumpy(out), R.rms_norm(x, w, eps)) < 1e-6
    d_res = cp.asarray(res)
    ops.rms_norm_add(lib, cp.asarray(x), cp.asarray(w), d_res, eps)
    assert rel_err(cp.asnumpy(d_res), res + R.rms_norm(x, w, eps)) < 1e-6


def test_rms_norm_in_place_per_head(lib):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 128)).astype(np.float32)
    w = rng.standard_normal(128).astype(np.float32)
    d = cp.asarray(x)
    ops.rms_norm(lib, d, cp.asarray(w), d, 1e-5)
    assert rel_err(cp.asnumpy(d), R.rms_norm(x, w, 1e-5)) < 1e-6


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("hd,rd,base,ff,scaling", [
    (64, 64, 10000.0, False, RopeScaling()),
    (128, 128, 500000.0, True, RopeScaling()),
    (256, 256, 1e6, False, RopeScaling("linear", 8.0)),
    (128, 64, 10000.0, False, RopeScaling()),
    (128, 128, 1e6, False, RopeScaling("yarn", 4.0, 32768, 1.0, 1.0, 32.0, 1.0)),
])
def test_rope(lib, mode, hd, rd, base, ff, scaling):
    rng = np.random.default_rng(hd + rd)
    t, h = 7, 3
    x = rng.standard_normal((t, h, hd)).astype(np.float32)
    pos = np.array([0, 1, 5, 100, 1000, 4095, 131000], dtype=np.int32)
    factors = (1.0 + rng.random(rd // 2) * 7).astype(np.float32) if ff else None
    cos, sin = R.rope_angles(pos, rd, base, scaling, factors)
    want = R.apply_rope(x, cos, sin, mode)
    d = cp.asarray(x)
    # the rotation of rope_kv_store, read off q (k and the caches are exercised in the next test)
    kv = cp.zeros((t, 1, hd), cp.float32)
    ck, cv = cp.zeros((1, 1, 131072, hd), cp.float16), cp.zeros((1, 1, 131072, hd), cp.float16)
    ops.rope_kv_store(lib, d, kv, kv, ck, cv, cp.asarray(pos), base=base, mode=mode, rope_dim=rd,
                      freq_factors=None if factors is None else cp.asarray(factors), scaling=scaling)
    assert rel_err(cp.asnumpy(d), want) < 1e-6


@pytest.mark.parametrize("mode,hd,rd,ns,t", [("norm", 128, 128, 1, 1), ("neox", 64, 32, 2, 5),
                                            ("neox", 256, 256, 1, 3)])
def test_rope_kv_store(lib, mode, hd, rd, ns, t):
    """The fused rope(q) + rope(k) + kv_store equals its numpy twin (rope's 1e-6, the fp16 cache exactly)."""
    rng = np.random.default_rng(hd + t)
    h, hkv, n_ctx = 6, 2, 40
    q = rng.standard_normal((t, h, hd)).astype(np.float32)
    k = rng.standard_normal((t, hkv, hd)).astype(np.float32)
    v = rng.standard_normal((t, hkv, hd)).astype(np.float32)
    pos = rng.choice(n_ctx, size=t, replace=False).astype(np.int32)
    seq = (np.arange(t) % ns).astype(np.int32)
    ck0 = np.full((ns, hkv, n_ctx, hd), np.nan, np.float16)  # NaN = not written
    cv0 = np.full((ns, hkv, n_ctx, hd), np.nan, np.float16)
    factors = (1.0 + rng.random(rd // 2)).astype(np.float32)
    cos, sin = R.rope_angles(pos, rd, 500000.0, RopeScaling(), factors)
    wq, wk, wck, wcv = R.rope_kv_store(q, k, v, ck0, cv0, pos, cos, sin, mode, seq)
    dq, dk, dck, dcv = cp.asarray(q), cp.asarray(k), cp.asarray(ck0), cp.asarray(cv0)
    ops_layers.rope_kv_store(lib, dq, dk, cp.asarray(v), dck, dcv, cp.asarray(pos), cp.asarray(seq),
                             base=500000.0, mode=mode, rope_dim=rd, freq_factors=cp.asarray(factors))
    assert rel_err(cp.asnumpy(dq), wq) < 1e-6
    assert rel_err(cp.asnumpy(dk), wk) < 1e-6
    gck, gcv = cp.asnumpy(dck), cp.asnumpy(dcv)
    assert np.array_equal(gcv, wcv, equal_nan=True)
    # k passes through fp16 after a rotation that may differ from numpy's in the last fp32 ulp
    written = ~np.isnan(wck)
    assert np.array_equal(~np.isnan(gck), written) and np.count_nonzero(written) == t * hkv * hd
    assert rel_err(gck[written].astype(np.float32), wck[written].astype(np.float32)) < 1e-3


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu(lib, kind):
    rng = np.random.default_rng(2)
    t, f = 5, 1000  # n_ff not a power of two
    g = (rng.standard_normal((t, f)) * 4).astype(np.float32)
    u = rng.standard_normal((t, f)).astype(np.float32)
    ref = R.swiglu(g, u) if kind == "swiglu" else R.geglu(g, u)
    out = poison(cp, (t, f))
    getattr(ops, kind)(lib, cp.asarray(g), cp.asarray(u), out)
    assert rel_err(cp.asnumpy(out), ref) < 1e-6
    out = poison(cp, (t, f))
    ops.glu(lib, cp.asarray(np.concatenate([g, u], axis=1)), out, kind)
    assert rel_err(cp.asnumpy(out), ref) < 1e-6


def test_softcap(lib):
    x = (np.random.default_rng(3).standard_normal(1000) * 50).astype(np.float32)
    d = cp.asarray(x)
    ops.softcap(lib, d, 30.0)
    assert rel_err(cp.asnumpy(d), R.softcap(x, 30.0)) < 1e-6


def _cache(rng, ns, hkv, n_ctx, hd, filled):
    """Random fp16 caches with `filled` positions written; the rest NaN (must never be read)."""
    k = np.full((ns, hkv, n_ctx, hd), np.nan, dtype=np.float16)
    v = np.full((ns, hkv, n_ctx, hd), np.nan, dtype=np.float16)
    k[:, :, :filled] = rng.standard_normal((ns, hkv, filled, hd))
    v[:, :, :filled] = rng.standard_normal((ns, hkv, filled, hd))
    return k, v


def _ref(q, k, v, pos, scale, window, softcap):
    """reference.attention on the fp16-rounded cache of one sequence (k, v (Hkv, S, D))."""
    s = int(pos.max()) + 1
    return R.attention(q, k[:, :s].astype(np.float32), v[:, :s].astype(np.float32), pos,
                       np.arange(s), scale, window or None, softcap or None)


@pytest.mark.parametrize("hd", [64, 128, 256])
@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (32, 8), (16, 1)])
@pytest.mark.parametrize("length,window,softcap", [(1, 0, 0.0), (300, 0, 0.0), (5000, 0, 0.0),
                                                   (700, 128, 0.0), (200, 0, 50.0)])
def test_attention_decode(lib, hd, h, hkv, length, window, softcap):
    rng = np.random.default_rng(hd * 7 + h + length)
    n_ctx = length + 3
    k, v = _cache(rng, 1, hkv, n_ctx, hd, length)
    q = rng.standard_normal((1, h, hd)).astype(np.float32)
    pos = np.array([length - 1], np.int32)
    scale = hd ** -0.5
    out = poison(cp, (1, h * hd))
    scratch = cp.empty(ops.attention_scratch_nbytes(1, h, hd), dtype=cp.uint8)
    ops.attention(lib, cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(pos), out, scale=scale,
                  window=window, softcap=softcap, scratch=scratch)
    assert rel_err(cp.asnumpy(out), _ref(q, k[0], v[0], pos, scale, window, softcap)) < 1e-5


@pytest.mark.parametrize("min_chunk", [1, 64, 128, 10000])
def test_attention_decode_chunking(lib, min_chunk):
    """Any split size gives the reference result; a short row after a long one in the same scratch
    (a replayed graph) must not read the long row's stale partials."""
    rng = np.random.default_rng(min_chunk)
    h, hkv, hd, n_ctx = 8, 2, 128, 3000
    k, v = _cache(rng, 1, hkv, n_ctx, hd, n_ctx)
    q = rng.standard_normal((1, h, hd)).astype(np.float32)
    scratch = cp.empty(ops.attention_scratch_nbytes(1, h, hd), dtype=cp.uint8)
    dq, dk, dv = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    for length in (3000, 70, 1, 700):
        pos = np.array([length - 1], np.int32)
        out = poison(cp, (1, h * hd))
        ops.attention(lib, dq, dk, dv, cp.asarray(pos), out, scale=0.1, scratch=scratch, min_chunk=min_chunk)
        assert rel_err(cp.asnumpy(out), _ref(q, k[0], v[0], pos, 0.1, 0, 0.0)) < 1e-5, length


def test_attention_decode_batch_of_sequences(lib):
    """Rows of different sequences and lengths in one launch (batched decode)."""
    rng = np.random.default_rng(5)
    hkv, h, hd, n_ctx = 2, 8, 128, 400
    k, v = _cache(rng, 3, hkv, n_ctx, hd, n_ctx)
    q = rng.standard_normal((4, h, hd)).astype(np.float32)
    pos, seq = np.array([0, 399, 150, 20], np.int32), np.array([2, 0, 1, 2], np.int32)
    out = poison(cp, (4, h * hd))
    scratch = cp.empty(ops.attention_scratch_nbytes(4, h, hd), dtype=cp.uint8)
    ops.attention(lib, cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(pos), out, scale=0.1,
                  window=64, seq=cp.asarray(seq), scratch=scratch)
    got = cp.asnumpy(out)
    for t in range(4):
        want = _ref(q[t:t + 1], k[seq[t]], v[seq[t]], pos[t:t + 1], 0.1, 64, 0.0)
        assert rel_err(got[t:t + 1], want) < 1e-5, t


@pytest.mark.parametrize("hd", [64, 128, 256])
@pytest.mark.parametrize("t,p0,window,h,hkv", [(9, 0, 0, 4, 2), (100, 0, 0, 8, 8), (77, 50, 0, 9, 3),
                                               (300, 0, 64, 4, 1), (130, 1000, 256, 8, 2)])
def test_attention_prefill(lib, hd, t, p0, window, h, hkv):
    rng = np.random.default_rng(hd + t + p0)
    n_ctx = p0 + t + 5
    k, v = _cache(rng, 1, hkv, n_ctx, hd, p0 + t)
    q = rng.standard_normal((t, h, hd)).astype(np.float32)
    pos = np.arange(p0, p0 + t, dtype=np.int32)
    scale = hd ** -0.5
    out = poison(cp, (t, h * hd))
    ops.attention(lib, cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(pos), out, scale=scale,
                  window=window)
    assert rel_err(cp.asnumpy(out), _ref(q, k[0], v[0], pos, scale, window, 0.0)) < 3e-3


def test_attention_prefill_softcap(lib):
    rng = np.random.default_rng(6)
    t, h, hkv, hd = 40, 4, 2, 128
    k, v = _cache(rng, 1, hkv, t, hd, t)
    q = (rng.standard_normal((t, h, hd)) * 3).astype(np.float32)
    pos = np.arange(t, dtype=np.int32)
    out = poison(cp, (t, h * hd))
    ops.attention(lib, cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(pos), out, scale=0.2,
                  softcap=20.0)
    assert rel_err(cp.asnumpy(out), _ref(q, k[0], v[0], pos, 0.2, 0, 20.0)) < 3e-3
