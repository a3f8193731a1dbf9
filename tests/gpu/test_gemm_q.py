"""GPU tier: gemm_q (cuda_src/gemm_q.cu, tensor-core GEMM with the dequantization fused) against numpy.

Weights are random valid blocks (tests/helpers/quant_blocks.py); the reference is float64
round(x) @ round(dequantize(raw)).T with round = the operand type (fp16, or bf16 round-to-nearest-even):
the kernel multiplies exactly those operands (dequant_value then one rounding, as dequant() does, which
test_kernels_matmul.test_dequant_half checks bit for bit), so only the fp32 accumulation order differs
-> relative L2 3e-5. Against the unrounded product the linear tests' tolerances hold (fp16 2e-3, bf16
1e-2). Shapes: M = 1, 9, 77, 512, 600 (one partial row tile, BM 64 and 128), N never a multiple of the
128-column tile, K with a half K tile at the end (4128 = 64.5 * 64) for the 32-value formats.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.gguf.ggml import GGMLType
from aircupy.gguf.quants import dequantize
from aircupy.cuda.ops.gemm_choice import GEMM_Q_TYPES
from aircupy.cuda.ops.packing import QWeight, repack_nbytes
from tests.gpu.kernel_fixtures import poison, rel_err
from tests.helpers.quant_blocks import random_blocks

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from aircupy.cuda.kernels import KernelLibrary  # noqa: E402
from aircupy.cuda import ops  # noqa: E402

TYPES = sorted((GGMLType[t] for t in GEMM_Q_TYPES), key=int)
KQ = (GGMLType.Q4_K, GGMLType.Q5_K)
TOL_ROUNDED = 3e-5
TOL_EXACT = {"f16": 2e-3, "bf16": 1e-2}


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


def _upload(lib, t, n, k, seed=0):
    rng = np.random.default_rng(seed)
    raw = random_blocks(t, n, k, rng).reshape(-1)
    ref = dequantize(raw, t, (n, k))
    packed = cp.empty(repack_nbytes(t, (n, k)), dtype=cp.uint8)
    ops.repack(lib, cp.asarray(raw), packed, t, (n, k))
    return QWeight(packed, t, (n, k)), ref


def _round(a, half):
    """fp32 values rounded to the mma operand type, as float64."""
    a = np.asarray(a, np.float32)
    if half == "f16":
        return a.astype(np.float16).astype(np.float64)
    u = a.view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


def _check(got, x, ref, half, base=0.0, bias=0.0):
    want = _round(x, half) @ _round(ref, half).T + base + bias
    exact = x.astype(np.float64) @ ref.astype(np.float64).T + base + bias
    assert np.all(np.isfinite(got))
    assert rel_err(got, want) < TOL_ROUNDED, rel_err(got, want)
    assert rel_err(got, exact) < TOL_EXACT[half]


def _shapes(t):
    if t in KQ:
        return [(1, 70, 256), (9, 130, 1280), (77, 300, 2304), (512, 129, 1024)]
    return [(1, 70, 4128), (9, 130, 576), (77, 300, 640), (512, 129, 1024)]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("half", ["f16", "bf16"])
def test_gemm_q_matches_numpy(lib, t, half):
    rng = np.random.default_rng(int(t))
    for m, n, k in _shapes(t):
        w, ref = _upload(lib, t, n, k, seed=m + n)
        x = rng.standard_normal((m, k)).astype(np.float32)
        out = poison(cp, (m, n))
        ops.gemm_q(lib, cp.asarray(x), w, out, half=half)
        _check(cp.asnumpy(out), x, ref, half)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("half", ["f16", "bf16"])
def test_gemm_q_takes_half_x(lib, t, half):
    """x already cast to the operand type (cast_half's output) gives the bits fp32 x gives."""
    rng = np.random.default_rng(21)
    m, n, k = 77, 300, 2304 if t in KQ else 4128
    w, ref = _upload(lib, t, n, k, seed=7)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xh = cp.empty((m, k), dtype=cp.float16 if half == "f16" else cp.uint16)
    ops.cast_half(lib, cp.asarray(x), xh)
    a, b = poison(cp, (m, n)), poison(cp, (m, n))
    ops.gemm_q(lib, xh, w, a, half=half)
    ops.gemm_q(lib, cp.asarray(x), w, b, half=half)
    assert np.array_equal(cp.asnumpy(a), cp.asnumpy(b))  # same operands, same kernel order
    _check(cp.asnumpy(a), x, ref, half)


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("m", [9, 200])
def test_gemm_q_accumulate_and_bias(lib, t, m):
    """The residual epilogue (out += x W^T) and the bias (qwen2's q/k/v) in one launch."""
    rng = np.random.default_rng(3 + m)
    n, k = 197, 1280 if t in KQ else 4128
    w, ref = _upload(lib, t, n, k, seed=1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    base = rng.standard_normal((m, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = cp.asarray(base)
    ops.gemm_q(lib, cp.asarray(x), w, out, accumulate=True, bias=cp.asarray(bias))
    _check(cp.asnumpy(out), x, ref, "f16", base=base.astype(np.float64), bias=bias.astype(np.float64))


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("m,splits", [(9, 2), (33, 8), (64, 5), (17, 64)])
def test_gemm_q_split_k(lib, t, m, splits):
    """Split over K into partials, then the ordered reduction with the residual and the bias: the
    numpy result; more splits than K tiles leave empty splits, which must add zeros."""
    rng = np.random.default_rng(m + splits)
    n, k = 197, 2304 if t in KQ else 4128
    w, ref = _upload(lib, t, n, k, seed=5)
    x = rng.standard_normal((m, k)).astype(np.float32)
    base = rng.standard_normal((m, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = cp.asarray(base)
    part = poison(cp, (ops.gemm_q_part_nbytes(m, n, splits),), np.uint8)
    ops.gemm_q(lib, cp.asarray(x), w, out, accumulate=True, bias=cp.asarray(bias), splits=splits, part=part)
    _check(cp.asnumpy(out), x, ref, "f16", base=base.astype(np.float64), bias=bias.astype(np.float64))


def test_gemm_q_many_tiles(lib):
    """BM 128 with a partial last row tile, 8 column tiles (the last partial), 64 K tiles."""
    rng = np.random.default_rng(9)
    m, n, k = 600, 1000, 4096
    w, ref = _upload(lib, GGMLType.Q4_0, n, k, seed=2)
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = poison(cp, (m, n))
    ops.gemm_q(lib, cp.asarray(x), w, out)
    _check(cp.asnumpy(out), x, ref, "f16")


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("half", ["f16", "bf16"])
def test_linear_fused_equals_cublas_path(lib, t, half):
    """linear's three prefill paths ("cublas", "fused", "fused_xh") multiply the same rounded operands:
    equal up to the fp32 summation order. The bias and accumulate epilogues agree too."""
    rng = np.random.default_rng(11)
    m, n, k = 77, 300, 2304 if t in KQ else 4128
    w, _ = _upload(lib, t, n, k, seed=4)
    x = cp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    bias = cp.asarray(rng.standard_normal(n).astype(np.float32))
    base = rng.standard_normal((m, n)).astype(np.float32)
    scratch = cp.empty(ops.linear_scratch_nbytes(n, k, m), dtype=cp.uint8)
    outs = {}
    for path in ("fused", "fused_xh", "fused_sk", "cublas"):
        outs[path] = cp.asarray(base)
        ops.linear(lib, x, w, outs[path], accumulate=True, bias=bias, scratch=scratch, half=half, path=path)
    for path in ("fused", "fused_xh", "fused_sk"):
        assert rel_err(cp.asnumpy(outs[path]), cp.asnumpy(outs["cublas"])) < TOL_ROUNDED, path


def test_bf16_operands_take_large_activations(lib):
    """Activations past fp16's 65504 (gemma3) stay finite with half="bf16"."""
    rng = np.random.default_rng(12)
    m, n, k = 20, 50, 640
    w, ref = _upload(lib, GGMLType.Q8_0, n, k, seed=5)
    x = (rng.standard_normal((m, k)) * 2e5).astype(np.float32)
    out = poison(cp, (m, n))
    ops.gemm_q(lib, cp.asarray(x), w, out, half="bf16")
    _check(cp.asnumpy(out), x, ref, "bf16")


def test_gemm_q_replays_in_a_cuda_graph(lib):
    """Prefill chunks are replayed as CUDA graphs: gemm_q captures (no allocation, no sync) and a
    replay reads the buffers' current contents."""
    rng = np.random.default_rng(13)
    m, n, k = 70, 260, 1024
    w, ref = _upload(lib, GGMLType.Q4_K, n, k, seed=6)
    x = cp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    out = poison(cp, (m, n))
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        ops.gemm_q(lib, x, w, out)  # loads the module and raises the smem limit outside the capture
        s.synchronize()
        s.begin_capture()
        ops.gemm_q(lib, x, w, out)
        g = s.end_capture()
        x2 = rng.standard_normal((m, k)).astype(np.float32)
        x.set(x2)
        g.launch(s)
        s.synchronize()
    _check(cp.asnumpy(out), x2, ref, "f16")


@pytest.mark.parametrize("preset,qtype", [("llama3-8b", "Q4_0"), ("qwen2-0.5b", "Q8_0"), ("gemma3-270m", "Q4_K")])
@pytest.mark.parametrize("path", ["fused", "fused_xh"])
def test_model_prefill_with_the_fused_path(lib, tmp_path, monkeypatch, preset, qtype, path):
    """A whole synthetic model (qwen2: q/k/v biases; gemma3: bf16 operands) with every supported prefill
    matmul forced to `path`: the logits of a 40-token prompt (chunks of 16, 16, 8 rows: the last chunk
    is a matvec) match the cuBLAS path's to fp32 summation order (same rounded operands), and greedy
    decode continues with the same tokens."""
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions
    from aircupy.cuda.ops import gemm_choice, matmul as cuda_matmul
    from aircupy.synth import synth_model
    tiny = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
    over = dict(tiny, sliding_window=8) if preset.startswith("gemma3") else tiny
    rep = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=2, overrides=over, seed=3, logit_std=8.0)
    used = []

    want = {}

    def forced(type_name, n, k, m, table=None):
        p = want["path"] if gemm_choice.gemm_q_supports(type_name, k) else "cublas"
        used.append(p)
        return p

    monkeypatch.setattr(cuda_matmul, "prefill_path", forced)   # the baseline is cuBLAS at every M

    with GGUFFile(rep.path) as g:
        m = CudaModel(g, ModelConfig.from_gguf(g), 64, lib=lib,
                      options=CudaOptions(prefill_rows=16, prefill_graph_slots=0))
        ids = np.random.default_rng(5).integers(0, m.config.vocab_size, 40).astype(np.int32)
        outs = {}
        for label in ("cublas", path):
            want["path"] = label
            cache = m.new_cache(64)
            cache.truncate(0)
            first = m.forward(ids, np.arange(40, dtype=np.int32), cache, all_logits=True)
            logits, toks = first, []
            for _ in range(3):
                toks.append(int(logits[-1].argmax()))
                logits = m.forward(np.array([toks[-1]], np.int32), np.array([cache.length], np.int32), cache)
            outs[label] = (first, toks)
        assert path in used  # the fused kernel really ran
        assert outs[path][1] == outs["cublas"][1]
        assert rel_err(outs[path][0], outs["cublas"][0]) < 1e-4
