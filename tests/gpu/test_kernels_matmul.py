"""GPU tier: repack, decode matvec, dequantization, GEMM and embedding rows against the numpy twins.

Weights are random valid blocks (tests/helpers/quant_blocks.py) with realistic scales; the reference
is x @ aircupy.gguf.quants.dequantize(raw).T in float64. Tolerances (relative L2 error):
  matvec, float weights: fp32 arithmetic -> 2e-6 (sum order and FMA only)
  matvec, quant weights: x is quantized to 15-bit fixed point per 32 values for the dp4a dot products,
    |error of x_j| <= amax(block of j)/32512 (cuda_src/matvec.cu), so every output must satisfy
    |out - ref| <= sum_j |w_j| amax_j / 32512 + 1e-6 sum_j |w_j x_j| (the bound, elementwise; on
    average the L2 error is ~5e-5 relative)
  get_rows: exact dequantization times the scale -> 1e-7
  dequant to fp16 / bf16: the fp16/bf16 rounding of the exact value -> exact equality with numpy's cast
  linear via GEMM: fp16 operands 2e-3, bf16 operands 1e-2 (operand rounding, fp32 accumulation).
Shapes include one-block rows, Gemma's 640-wide rows, odd row counts and item counts that are not a
multiple of the warp.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.gguf.quants import dequantize
from aircupy.cuda.ops.packing import QWeight, repack_nbytes, repack_numpy
from tests.gpu.kernel_fixtures import poison, rel_err
from tests.helpers.quant_blocks import random_blocks

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from aircupy.cuda.kernels import KernelLibrary  # noqa: E402
from aircupy.cuda.ops import layers as ops_layers  # noqa: E402
from aircupy.cuda.ops import matmul as ops_mm  # noqa: E402
from aircupy.cuda import ops  # noqa: E402
from aircupy.reference import ops as R  # noqa: E402

LEGACY = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
          GGMLType.Q5_1, GGMLType.Q8_0]
KQUANTS = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
ALL = LEGACY + KQUANTS


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


def _weight(t, n, k, seed):
    rng = np.random.default_rng(seed)
    raw = random_blocks(t, n, k, rng).reshape(-1)
    ref = dequantize(raw, t, (n, k))
    d_raw = cp.asarray(raw)
    packed = cp.empty(repack_nbytes(t, (n, k)), dtype=cp.uint8)
    return raw, ref, d_raw, packed


def _upload(lib, t, n, k, seed=0):
    raw, ref, d_raw, packed = _weight(t, n, k, seed)
    ops.repack(lib, d_raw, packed, t, (n, k))
    return QWeight(packed, t, (n, k)), ref, raw


FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _check_matvec(got, x, ref, t, base=None, bias=None):
    """got (M, N) vs base + x @ ref.T + bias: relative L2 2e-6 for float weights, else the elementwise
    bound of the x quantization (module docstring)."""
    x64, w64 = x.astype(np.float64), ref.astype(np.float64)
    want = x64 @ w64.T + (0.0 if base is None else base) + (0.0 if bias is None else bias)
    if t in FLOATS:
        assert rel_err(got, want) < 2e-6, t.name
        return
    m, k = x.shape
    amax = np.abs(x64).reshape(m, k // 32, 32).max(axis=-1).repeat(32, axis=1)  # (M, K)
    bound = (amax @ np.abs(w64).T) / 32512 + 1e-6 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
    assert np.all(np.isfinite(got))
    excess = np.abs(got - want) / bound
    assert excess.max() <= 1.0, (t.name, float(excess.max()))


def _widths(t):
    return [256, 1280, 2304] if t in KQUANTS else [32, 576, 640, 4128]


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_repack_matches_host_twin(lib, t):
    n, k = 7, _widths(t)[1]
    raw, _, d_raw, packed = _weight(t, n, k, 1)
    packed.fill(0xAB)
    ops.repack(lib, d_raw, packed, t, (n, k))
    want = repack_numpy(raw, t, (n, k))
    got = cp.asnumpy(packed)
    # the pad between bodies and heads is not written by the kernel: compare the meaningful bytes
    from aircupy.cuda.ops.packing import HEADERS, heads_offset
    if t in HEADERS:
        nb = n * k // {True: 256, False: 32}[t in KQUANTS]
        body = nb * (raw.size // nb - HEADERS[t][1])
        h0 = heads_offset(t, (n, k))
        assert np.array_equal(got[:body], want[:body])
        assert np.array_equal(got[h0:], want[h0:])
    else:
        assert np.array_equal(got, want)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.Q4_K], ids=lambda t: t.name)
def test_repack_stacked_rows(lib, t):
    """Two tensors repacked into one stacked matrix == the packed layout of their concatenation."""
    k = _widths(t)[1]
    raw_a, _, da, _ = _weight(t, 3, k, 2)
    raw_b, _, db, _ = _weight(t, 5, k, 3)
    dst = cp.zeros(repack_nbytes(t, (8, k)), dtype=cp.uint8)
    ops.repack(lib, da, dst, t, (3, k), row0=0, dst_rows=8)
    ops.repack(lib, db, dst, t, (5, k), row0=3, dst_rows=8)
    want = repack_numpy(np.concatenate([raw_a, raw_b]), t, (8, k))
    assert np.array_equal(cp.asnumpy(dst), want)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_matvec(lib, t, m):
    rng = np.random.default_rng(10 + m)
    for n, k in [(1, _widths(t)[0]), (37, _widths(t)[1]), (130, _widths(t)[2])]:
        w, ref, _ = _upload(lib, t, n, k, seed=n + k)
        x = rng.standard_normal((m, k)).astype(np.float32)
        out = poison(cp, (m, n))
        ops.matvec(lib, cp.asarray(x), w, out)
        _check_matvec(cp.asnumpy(out), x, ref, t)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("prefetch2", [True, False])
def test_matvec_long_rows_many_blocks(lib, t, m, prefetch2):
    """K over several shared-memory tiles (16384/M values per tile), N over many rows per block, and
    activations with a few large outliers (per-32 quantization scales must follow them); with and
    without the early second pipeline stage (a speed knob: same result)."""
    rng = np.random.default_rng(20 + m)
    n, k = 1100, 17408
    w, ref, _ = _upload(lib, t, n, k, seed=3)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, ::997] *= 300.0
    out = poison(cp, (m, n))
    ops.matvec(lib, cp.asarray(x), w, out, prefetch2=prefetch2)
    _check_matvec(cp.asnumpy(out), x, ref, t)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q5_K, GGMLType.F16], ids=lambda t: t.name)
def test_matvec_accumulate_and_bias(lib, t):
    rng = np.random.default_rng(5)
    n, k, m = 33, _widths(t)[1], 2
    w, ref, _ = _upload(lib, t, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    base = rng.standard_normal((m, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = cp.asarray(base)
    ops.matvec(lib, cp.asarray(x), w, out, accumulate=True, bias=cp.asarray(bias))
    _check_matvec(cp.asnumpy(out), x, ref, t, base=base, bias=bias)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.F32],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("m,k", [(1, 1280), (3, 2304), (8, 17408)])
def test_matvec_fused_rms_norm(lib, t, m, k):
    """matvec(x, norm_w=w) == rms_norm(x, w) @ W^T (numpy twins composed); 17408 at M=8 spans tiles."""
    rng = np.random.default_rng(k + m)
    n = 70
    w, ref, _ = _upload(lib, t, n, k, seed=7)
    x = (rng.standard_normal((m, k)) * 5).astype(np.float32)
    nw = rng.standard_normal(k).astype(np.float32)
    out = poison(cp, (m, n))
    ops_mm.matvec(lib, cp.asarray(x), w, out, norm_w=cp.asarray(nw), eps=1e-5)
    _check_matvec(cp.asnumpy(out), R.rms_norm(x, nw, 1e-5), ref, t)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("m,f,kind", [(1, 1280, "swiglu"), (3, 2304, "geglu"), (8, 17408, "swiglu")])
def test_glu_quant_matvec_xq(lib, t, m, f, kind):
    """glu_quant + matvec_xq (quantize once per step) == glu + matvec: the same activation values and
    the same quantization code, so equal to fp32 rounding; and within the matvec bound of the numpy
    twin glu(gate, up) @ W^T. Accumulates into a base, as the down projection does."""
    rng = np.random.default_rng(f + m)
    n = 45
    w, ref, _ = _upload(lib, t, n, f, seed=8)
    gu = (rng.standard_normal((m, 2 * f)) * 3).astype(np.float32)
    gu[:, ::613] *= 40.0
    base = rng.standard_normal((m, n)).astype(np.float32)
    act = (R.swiglu if kind == "swiglu" else R.geglu)(gu[:, :f], gu[:, f:])
    d_gu = cp.asarray(gu)
    xq = cp.full(m * ops_mm.xq_row_nbytes(f), 0xFF, dtype=cp.uint8)
    ops_layers.glu_quant(lib, d_gu, xq, kind)
    got = cp.asarray(base)
    ops_mm.matvec_xq(lib, xq, m, w, got, accumulate=True)
    plain_act = poison(cp, (m, f))
    ops.glu(lib, d_gu, plain_act, kind)
    plain = cp.asarray(base)
    ops.matvec(lib, plain_act, w, plain, accumulate=True)
    assert rel_err(cp.asnumpy(got), cp.asnumpy(plain)) < 1e-6
    _check_matvec(cp.asnumpy(got), act, ref, t, base=base)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("half", ["f16", "bf16"])
def test_dequant_half(lib, t, half):
    n, k = 9, _widths(t)[1]
    w, ref, _ = _upload(lib, t, n, k, seed=4)
    out = poison(cp, (n, k), np.float16 if half == "f16" else np.uint16)
    ops.dequant(lib, w, out)
    got = cp.asnumpy(out)
    if half == "f16":
        assert np.array_equal(got.view(np.uint16), ref.astype(np.float16).view(np.uint16))
    else:  # bf16 round to nearest even of the fp32 value
        u = ref.view(np.uint32).astype(np.uint64)
        want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.BF16],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("half,tol", [("f16", 2e-3), ("bf16", 1e-2)])
def test_linear_gemm_path(lib, t, half, tol):
    rng = np.random.default_rng(6)
    n, k, m = 70, _widths(t)[1], 37
    w, ref, _ = _upload(lib, t, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    scratch = cp.empty(ops.linear_scratch_nbytes(n, k, m), dtype=cp.uint8)
    out = cp.ones((m, n), dtype=cp.float32)
    ops.linear(lib, cp.asarray(x), w, out, accumulate=True, bias=cp.asarray(bias), scratch=scratch, half=half)
    want = 1.0 + x.astype(np.float64) @ ref.T.astype(np.float64) + bias
    assert rel_err(cp.asnumpy(out), want) < tol


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_get_rows(lib, t):
    v, e = 50, _widths(t)[1]
    w, ref, _ = _upload(lib, t, v, e, seed=8)
    ids = np.array([0, 49, 7, 7, 23], dtype=np.int32)
    out = poison(cp, (len(ids), e))
    ops.get_rows(lib, w, cp.asarray(ids), out, scale=2.5)
    assert rel_err(cp.asnumpy(out), ref[ids].astype(np.float64) * 2.5) < 1e-7


def test_get_rows_bad_id_is_nan(lib):
    w, _, _ = _upload(lib, GGMLType.Q8_0, 10, 64)
    out = cp.zeros((1, 64), dtype=cp.float32)
    ops.get_rows(lib, w, cp.asarray(np.array([10], dtype=np.int32)), out)
    assert np.isnan(cp.asnumpy(out)).all()


def test_matvec_replays_in_a_cuda_graph(lib):
    """The decode step is captured once and replayed: launchers must capture (no allocation, no sync)
    and a replay must read the buffers' current contents."""
    rng = np.random.default_rng(11)
    n, k = 300, 640
    w, ref, _ = _upload(lib, GGMLType.Q5_0, n, k)
    x = cp.asarray(rng.standard_normal((2, k)).astype(np.float32))
    out = poison(cp, (2, n))
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        ops.matvec(lib, x, w, out)  # first call compiles/loads outside the capture
        s.synchronize()
        s.begin_capture()
        ops.matvec(lib, x, w, out)
        g = s.end_capture()
        x2 = rng.standard_normal((2, k)).astype(np.float32)
        x.set(x2)
        g.launch(s)
        s.synchronize()
    _check_matvec(cp.asnumpy(out), x2, ref, GGMLType.Q5_0)
