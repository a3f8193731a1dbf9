"""GPU tier: repack, decode matvec, dequantization, GEMM and embedding rows against the numpy twins.

Weights are random valid blocks (tests/helpers/quant_blocks.py) with realistic scales; the reference
is x @ aircupy.gguf.quants.dequantize(raw).T in float64. Tolerances (relative L2 error):
  matvec / get_rows: fp32 arithmetic on exactly dequantized weights -> 2e-6 (sum order and FMA only)
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
from aircupy.ops.packing import QWeight, repack_nbytes, repack_numpy
from tests.gpu.kernel_fixtures import poison, rel_err
from tests.helpers.quant_blocks import random_blocks

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from aircupy.device.kernels import KernelLibrary  # noqa: E402
from aircupy.ops import cuda_ops as ops  # noqa: E402

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
    from aircupy.ops.packing import HEADERS, heads_offset
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
        want = x.astype(np.float64) @ ref.astype(np.float64).T
        assert rel_err(cp.asnumpy(out), want) < 2e-6, (t.name, n, k, m)


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
    want = base + x.astype(np.float64) @ ref.T.astype(np.float64) + bias
    assert rel_err(cp.asnumpy(out), want) < 2e-6


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
