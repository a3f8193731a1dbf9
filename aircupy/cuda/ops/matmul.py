"""Typed launchers of the weight kernels: repack, decode matvec, dequantization, GEMM, embedding rows.

Weights are QWeight (aircupy/cuda/ops/packing.py: the packed layout, shape (N, K)); activations are fp32.
  matvec    M = 1..8 rows, dequantization fused (cuda_src/matvec.cu)
  gemm      fp16/bf16 operands, fp32 output, cuBLAS GemmEx on the tensor cores
  gemm_q    any M, quant weights dequantized inside the tensor-core GEMM's tile loader (gemm_q.cu)
  linear    matvec for M <= 8, else per shape (ops/gemm_choice.py) gemm_q, or dequant + cast into
            `scratch` and gemm (prefill)
Every launcher takes `stream` (None = cupy's current stream) and preallocated outputs; none allocates.
"""
from __future__ import annotations

import numpy as np

from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType
from aircupy.cuda.ops.launch import NULL, cdiv, check, half_flag, launch
from aircupy.cuda.ops.gemm_choice import PATHS, gemm_q_supports, prefill_path
from aircupy.cuda.ops.packing import HEADERS, QWeight, heads_offset, needs_repack, repack_nbytes

# type -> (kernel name suffix, values per block, items per block) -- cuda_src/blocks.cuh's Fmt* structs
FORMATS: dict[GGMLType, tuple[str, int, int]] = {
    GGMLType.F32: ("f32", 32, 1), GGMLType.F16: ("f16", 32, 1), GGMLType.BF16: ("bf16", 32, 1),
    GGMLType.Q4_0: ("q4_0", 32, 1), GGMLType.Q4_1: ("q4_1", 32, 1), GGMLType.Q5_0: ("q5_0", 32, 1),
    GGMLType.Q5_1: ("q5_1", 32, 1), GGMLType.Q8_0: ("q8_0", 32, 1), GGMLType.Q2_K: ("q2_k", 256, 4),
    GGMLType.Q3_K: ("q3_k", 256, 4), GGMLType.Q4_K: ("q4_k", 256, 8), GGMLType.Q5_K: ("q5_k", 256, 8),
    GGMLType.Q6_K: ("q6_k", 256, 4),
}
MAX_MATVEC_ROWS = 8
_ALIGN = 256


def _body_head(w: QWeight):
    """(body pointer arg, head pointer arg) of a packed weight."""
    check(w.data, np.uint8, None, "weight data")
    if w.data.size < w.nbytes:
        raise ValueError(f"weight data has {w.data.size} bytes, its layout needs {w.nbytes}")
    if needs_repack(w.ggml_type):
        return w.data, w.data[heads_offset(w.ggml_type, w.shape):]
    return w.data, NULL


def repack(lib, src, dst, t, shape, *, row0: int = 0, dst_rows: int | None = None, stream=None) -> None:
    """GGUF bytes of a (n_rows, K) tensor (device uint8 `src`) -> packed layout in `dst`.

    With dst_rows, dst holds a stacked tensor of dst_rows rows and this one lands at rows
    [row0, row0 + n_rows) of it (q/k/v or gate/up fused into one matrix). src and dst must not overlap.
    """
    t = GGMLType(t)
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    k = int(shape[-1])
    total = n_rows if dst_rows is None else int(dst_rows)
    be, bb = BLOCK_GEOMETRY[t]
    nb = k // be
    check(src, np.uint8, (n_rows * nb * bb,), "src")
    check(dst, np.uint8, None, "dst")
    if dst.size < repack_nbytes(t, (total, k)) or row0 + n_rows > total:
        raise ValueError("dst too small for the stacked tensor")
    if not needs_repack(t):
        o = row0 * nb * bb
        launch_copy = dst[o:o + src.size]
        if stream is None:
            launch_copy[...] = src
        else:
            with stream:
                launch_copy[...] = src
        return
    off, hb = HEADERS[t]
    body = dst[row0 * nb * (bb - hb):]
    head = dst[heads_offset(t, (total, k)) + row0 * nb * hb:]
    n_blocks = n_rows * nb
    launch(lib.fn("repack_blocks"), (cdiv(n_blocks * bb // 2, 256),), (256,),
           (src, body, head, np.int64(n_blocks), np.int32(bb), np.int32(off), np.int32(hb)), stream)


def matvec_grid(lib, n: int) -> int:
    """Blocks of the matvec: 2 per SM (what registers allow) when there are rows enough, each block
    taking a contiguous range of rows for its 8 warps; never fewer than 8 rows per block."""
    return max(1, min(cdiv(n, 8), 2 * lib.n_sm))


_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def xq_row_nbytes(k: int) -> int:
    """Bytes of one pre-quantized activation row of k values (cuda_src/xquant.cuh: int8 planes h and l,
    fp32 scale per 32 values, fp32 sum per 16): 2.375 * k, less than the fp32 row it replaces."""
    return 2 * k + (k // 32) * 4 + (k // 16) * 4


def takes_xq(w: QWeight) -> bool:
    """Whether matvec_xq can take pre-quantized activations for this weight (quant types, K % 128 == 0)."""
    return w.ggml_type not in _FLOAT_TYPES and w.shape[1] % 128 == 0


def _matvec_launch(lib, x, m: int, w: QWeight, out, accumulate, bias, normw, eps, xmode, prefetch2,
                   stream) -> None:
    n, k = w.shape
    check(out, np.float32, (m, n), "out")
    if not 1 <= m <= MAX_MATVEC_ROWS:
        raise ValueError(f"matvec takes 1..{MAX_MATVEC_ROWS} rows, got {m}")
    if bias is not None:
        check(bias, np.float32, (n,), "bias")
    mr = next(r for r in (1, 2, 4, 8) if r >= m)
    body, head = _body_head(w)
    name = f"matvec_{FORMATS[w.ggml_type][0]}_m{mr}"
    launch(lib.fn(name), (matvec_grid(lib, n),), (256,),
           (body, head, x, out, NULL if bias is None else bias, np.int32(n), np.int32(k), np.int32(m),
            np.int32(1 if accumulate else 0), NULL if normw is None else normw, np.float32(eps),
            np.int32(xmode | (4 if prefetch2 else 0))), stream)


def matvec(lib, x, w: QWeight, out, *, accumulate: bool = False, bias=None, norm_w=None, eps: float = 0.0,
           prefetch2: bool = True, stream=None) -> None:
    """out (M, N) (+)= x (M, K) @ W^T (+ bias (N,)), M = 1..8, fp32; W dequantized on the fly.
    With norm_w (f32 (K,)): x is rms-normed on the way in, out = rms_norm(x, norm_w, eps) @ W^T (each
    block computes the rows' 1/rms itself: no normed copy of x, no separate launch). prefetch2: the
    blocks issue their first two pipeline steps' weight loads before staging x (a speed knob only)."""
    n, k = w.shape
    m = int(x.shape[0])
    check(x, np.float32, (m, k), "x")
    if norm_w is not None:
        check(norm_w, np.float32, (k,), "norm_w")
    _matvec_launch(lib, x, m, w, out, accumulate, bias, norm_w, eps, 0 if norm_w is None else 1, prefetch2,
                   stream)


def matvec_xq(lib, xq, m: int, w: QWeight, out, *, accumulate: bool = False, bias=None, prefetch2: bool = True,
              stream=None) -> None:
    """matvec over m activation rows already quantized into `xq` (uint8, m * xq_row_nbytes(K) bytes,
    16-byte aligned; written by cuda_layers.glu_quant): the blocks copy x instead of quantizing it."""
    n, k = w.shape
    if not takes_xq(w):
        raise ValueError(f"matvec_xq needs a quant type and K % 128 == 0, got {w.ggml_type.name} K={k}")
    check(xq, np.uint8, None, "xq")
    if xq.size < m * xq_row_nbytes(k) or xq.data.ptr % 16:
        raise ValueError(f"xq: {xq.size} bytes at {xq.data.ptr:#x}; needs {m * xq_row_nbytes(k)}, 16-byte aligned")
    _matvec_launch(lib, xq, m, w, out, accumulate, bias, None, 0.0, 2, prefetch2, stream)


def dequant(lib, w: QWeight, out, *, stream=None) -> None:
    """out (N, K) fp16 (float16 array) or bf16 (uint16 array of bf16 bits) = dequantize(W)."""
    n, k = w.shape
    check(out, out.dtype, (n, k), "out")
    bf = half_flag(out)
    fmt, be, ipb = FORMATS[w.ggml_type]
    items = n * (k // be) * ipb
    body, head = _body_head(w)
    launch(lib.fn(f"dequant_{fmt}"), (cdiv(items, 256),), (256,),
           (body, head, out, np.int32(n), np.int32(k), bf), stream)


def cast_half(lib, x, out, *, stream=None) -> None:
    """fp32 -> fp16 (float16 out) or bf16 (uint16 out), round to nearest even; same shape."""
    check(x, np.float32, None, "x")
    check(out, out.dtype, x.shape, "out")
    launch(lib.fn("cast_half"), (cdiv(x.size, 256),), (256,), (x, out, np.int64(x.size), half_flag(out)), stream)


def gemm(lib, a, b, out, *, accumulate: bool = False, stream=None) -> None:
    """out (M, N) fp32 (+)= a (M, K) @ b (N, K)^T; a, b both fp16 or both bf16 (uint16); cuBLAS GemmEx,
    fp32 accumulation and output (tensor cores)."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    m, k = (int(s) for s in a.shape)
    n = int(b.shape[0])
    check(a, a.dtype, (m, k), "a")
    check(b, a.dtype, (n, k), "b")
    check(out, np.float32, (m, n), "out")
    dt = 14 if half_flag(a) else 2  # CUDA_R_16BF / CUDA_R_16F
    alpha = np.ones(1, np.float32)
    beta = np.ones(1, np.float32) if accumulate else np.zeros(1, np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    # column-major view: out^T (N x M) = b (K x N)^T @ a^T (K x M)
    args = (handle, 1, 0, n, m, k, alpha.ctypes.data, b.data.ptr, dt, k, a.data.ptr, dt, k,
            beta.ctypes.data, out.data.ptr, 0, n, getattr(cublas, "CUBLAS_COMPUTE_32F", 68),
            getattr(cublas, "CUBLAS_GEMM_DEFAULT_TENSOR_OP", 99))
    s = stream if stream is not None else cupy.cuda.get_current_stream()
    if s.ptr and cupy.cuda.runtime.streamIsCapturing(s.ptr):
        # cupy's cuBLAS wrappers refuse stream capture: the same two calls through ctypes (graph-
        # captured prefill, aircupy/cuda/cublas_capture.py); alpha/beta are read now, baked in.
        from aircupy.cuda.cublas_capture import process_cublas
        process_cublas().gemm(handle, s.ptr, args[1:])
        return
    if stream is None:
        cublas.gemmEx(*args)
    else:
        with stream:
            cublas.gemmEx(*args)


def warm_gemm(lib, shapes, scratch, *, half: str = "f16", rows: int = 16, stream=None) -> int:
    """One cuBLAS GEMM of `rows` rows per (n, k) of `shapes`, on whatever `scratch` (device uint8)
    holds, the output in it too: cuBLAS's first-use costs (library set-up, kernel loading: a
    noticeable part of a second for the first GEMM of a process) are paid where this is called (a model's load, while the disk is the bound), not at the first prompt. Shapes whose
    operands do not fit `scratch` are skipped. Returns how many GEMMs ran."""
    hdt = np.uint16 if half == "bf16" else np.float16
    ran = 0
    for n, k in sorted(set(shapes)):
        wo = cdiv(n * k * 2, _ALIGN) * _ALIGN
        oo = wo + cdiv(rows * k * 2, _ALIGN) * _ALIGN
        if oo + rows * n * 4 > scratch.nbytes:
            continue
        w = scratch[:n * k * 2].view(hdt).reshape(n, k)
        x = scratch[wo:wo + rows * k * 2].view(hdt).reshape(rows, k)
        out = scratch[oo:oo + rows * n * 4].view(np.float32).reshape(rows, n)
        gemm(lib, x, w, out, stream=stream)
        ran += 1
    return ran


def linear_scratch_nbytes(n: int, k: int, m_max: int) -> int:
    """Scratch bytes `linear` needs for an (n, k) weight and up to m_max rows (0 when m_max <= 8)."""
    if m_max <= MAX_MATVEC_ROWS:
        return 0
    from aircupy.cuda.ops.gemm_choice import SMALL_M
    split_k = gemm_q_part_nbytes(min(m_max, SMALL_M), n, 8)   # the "fused_sk" partials, at most 8 splits
    return max(split_k, cdiv(n * k * 2, _ALIGN) * _ALIGN + cdiv(m_max * k * 2, _ALIGN) * _ALIGN)


GEMM_Q_BN = 128  # output columns per block (cuda_src/gemm_q.cu GQ_BN)


def gemm_q_bm(m: int) -> int:
    """Rows per block of gemm_q: 128 from 128 rows up (half the weight tile decodes per output), else 64."""
    return 128 if m >= 128 else 64


def gemm_q_smem_nbytes(bm: int) -> int:
    """Dynamic shared memory of gemm_q: 2 stages of (128 weight + bm x) rows of 72 halves."""
    return 2 * (GEMM_Q_BN + bm) * 72 * 2


def gemm_q_splits(lib, m: int, n: int, k: int, bm: int) -> int:
    """K splits for gemm_q: enough blocks for two per SM (its __launch_bounds__) when the M x N tiles
    alone are fewer, at most 8 and at most one 64-value K tile per split."""
    tiles = cdiv(n, GEMM_Q_BN) * cdiv(m, bm)
    want = cdiv(2 * getattr(lib, "n_sm", 132), tiles)
    return max(1, min(8, want, cdiv(k, 64)))


def gemm_q_part_nbytes(m: int, n: int, splits: int) -> int:
    """Scratch bytes of gemm_q's split-K partials: (splits, M, N) fp32."""
    return splits * m * n * 4 if splits > 1 else 0


def gemm_q(lib, x, w: QWeight, out, *, accumulate: bool = False, bias=None, half: str = "f16",
           bm: int | None = None, splits: int = 1, part=None, stream=None) -> None:
    """out (M, N) (+)= x (M, K) @ W^T (+ bias (N,)) on the tensor cores, any M >= 1, no scratch: each
    weight tile is dequantized into shared memory (the values dequant() writes) and multiplied in
    `half` ("f16" | "bf16") with fp32 accumulation and output. x is fp32 (rounded to `half` on the way
    in) or already `half` (float16 for "f16", uint16 bf16 bits for "bf16": cast_half's output). Types:
    gemm_choice.GEMM_Q_TYPES (K % 256 == 0 for Q4_K/Q5_K). bm (64 | 128, rows per block) overrides
    gemm_q_bm(M) for measurements. splits > 1: split-K into `part` (uint8 scratch of at least
    gemm_q_part_nbytes), then an ordered reduction (deterministic) with accumulate and bias."""
    n, k = w.shape
    m = int(x.shape[0]) if x.ndim == 2 else -1
    if not gemm_q_supports(w.ggml_type.name, k):
        raise ValueError(f"gemm_q has no kernel for {w.ggml_type.name} weights with K = {k}")
    if half not in ("f16", "bf16"):
        raise ValueError(f"half must be 'f16' or 'bf16', got {half!r}")
    xh = x.dtype != np.float32
    check(x, (np.uint16 if half == "bf16" else np.float16) if xh else np.float32, (m, k), "x")
    if m < 1:
        raise ValueError("gemm_q needs at least one row")
    check(out, np.float32, (m, n), "out")
    if bias is not None:
        check(bias, np.float32, (n,), "bias")
    body, head = _body_head(w)
    bm = gemm_q_bm(m) if bm is None else int(bm)
    if bm not in (64, 128):
        raise ValueError(f"bm must be 64 or 128, got {bm}")
    smem = gemm_q_smem_nbytes(bm)
    kern = lib.fn(f"gemm_q_{FORMATS[w.ggml_type][0]}_{half}_bm{bm}", smem)
    if splits > 1:
        need = gemm_q_part_nbytes(m, n, splits)
        if part is None or part.dtype != np.uint8 or part.size < need:
            raise ValueError(f"gemm_q with {splits} splits needs a uint8 part scratch of {need} bytes")
        pf = part[:need].view(np.float32)
        launch(kern, (cdiv(n, GEMM_Q_BN), cdiv(m, bm), splits), (256,),
               (body, head, x, out, NULL, np.int32(m), np.int32(n), np.int32(k), np.int32(0),
                np.int32(1 if xh else 0), pf), stream, shared_mem=smem)
        launch(lib.fn("gemm_q_reduce"), (cdiv(m * n, 256),), (256,),
               (pf, out, NULL if bias is None else bias, np.int32(m), np.int32(n), np.int32(splits),
                np.int32(1 if accumulate else 0)), stream)
        return
    launch(kern, (cdiv(n, GEMM_Q_BN), cdiv(m, bm)), (256,),
           (body, head, x, out, NULL if bias is None else bias, np.int32(m), np.int32(n), np.int32(k),
            np.int32(1 if accumulate else 0), np.int32(1 if xh else 0), NULL), stream, shared_mem=smem)


def linear(lib, x, w: QWeight, out, *, accumulate: bool = False, bias=None, scratch=None,
           half: str = "f16", path: str | None = None, stream=None) -> None:
    """out (M, N) (+)= x (M, K) @ W^T (+ bias). M <= 8: fused matvec. Else the prefill path of the shape
    (gemm_choice.prefill_path; `path` forces one): "cublas": W dequantized and x cast to `half` ("f16",
    or "bf16" where activations may pass 65504, e.g. gemma3) in `scratch` (uint8 of
    linear_scratch_nbytes) and multiplied by cuBLAS on the tensor cores; "fused": gemm_q on fp32 x (no
    scratch); "fused_xh": x cast to `half` into `scratch`, then gemm_q; "fused_sk": gemm_q on fp32 x
    split over K (gemm_q_splits) with its partials in `scratch` (a batch's few decode rows)."""
    m = int(x.shape[0])
    if m <= MAX_MATVEC_ROWS:
        matvec(lib, x, w, out, accumulate=accumulate, bias=bias, stream=stream)
        return
    n, k = w.shape
    if path is None:
        path = prefill_path(w.ggml_type.name, n, k, m)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "fused":
        gemm_q(lib, x, w, out, accumulate=accumulate, bias=bias, half=half, stream=stream)
        return
    if path == "fused_sk":
        splits = gemm_q_splits(lib, m, n, k, gemm_q_bm(m))
        gemm_q(lib, x, w, out, accumulate=accumulate, bias=bias, half=half, splits=splits, part=scratch,
               stream=stream)
        return
    check(x, np.float32, (m, k), "x")
    if scratch is None or scratch.size < linear_scratch_nbytes(n, k, m):
        raise ValueError(f"linear with {m} rows needs scratch of {linear_scratch_nbytes(n, k, m)} bytes")
    hdt = np.uint16 if half == "bf16" else np.float16
    if path == "fused_xh":
        xh = scratch[:m * k * 2].view(hdt).reshape(m, k)
        cast_half(lib, x, xh, stream=stream)
        gemm_q(lib, xh, w, out, accumulate=accumulate, bias=bias, half=half, stream=stream)
        return
    wo = cdiv(n * k * 2, _ALIGN) * _ALIGN
    wh = scratch[:n * k * 2].view(hdt).reshape(n, k)
    xh = scratch[wo:wo + m * k * 2].view(hdt).reshape(m, k)
    dequant(lib, w, wh, stream=stream)
    cast_half(lib, x, xh, stream=stream)
    gemm(lib, xh, wh, out, accumulate=accumulate, stream=stream)
    if bias is not None:
        check(bias, np.float32, (n,), "bias")
        launch(lib.fn("add_bias"), (cdiv(m * n, 256),), (256,), (out, bias, np.int32(m), np.int32(n)), stream)


def get_rows(lib, w: QWeight, ids, out, *, scale: float = 1.0, stream=None) -> None:
    """out (T, E) fp32 = dequantized rows ids (int32 (T,)) of the (V, E) table, times `scale`."""
    v, e = w.shape
    t = int(ids.shape[0])
    check(ids, np.int32, (t,), "ids")
    check(out, np.float32, (t, e), "out")
    body, head = _body_head(w)
    launch(lib.fn(f"get_rows_{FORMATS[w.ggml_type][0]}"), (t,), (128,),
           (body, head, ids, out, np.int32(t), np.int32(e), np.int32(v), np.float32(scale)), stream)
