"""Typed launchers of the per-layer kernels: RMSNorm (+ residual fusions), RoPE, GLU, KV cache, attention.

All activations are fp32 (Gemma3's residual stream overflows fp16); the KV cache is fp16, per layer,
in one of two layouts (cuda_src/common.cuh kv_row):
  slab  (n_seq, Hkv, n_ctx, hd) -- a 3-D (Hkv, n_ctx, hd) cache is one sequence; row t is sequence seq[t];
  paged (num_blocks, Hkv, bs, hd), bs a power of two, with `tables` int32 (n_tables, max_blocks): row t
        reads the blocks of table seq[t] (seq None: table 0), and rope_kv_store writes row t at
        `slots[t]` = block * bs + offset (engine/blocks.py's slot ids; negative: not stored).
Dynamic values (positions, slots, tables, hence the attention length) are read from device memory, so a
captured graph stays valid as they change.
"""
from __future__ import annotations

import math

import numpy as np

from aircupy.cuda.ops.launch import NULL, cdiv, check, launch

DECODE_MAX_ROWS = 8      # attention rows handled by the split-KV decode kernel; more -> prefill kernel
MAX_SPLITS = 64          # KV splits of the decode kernel (fixed per launch shape: graph-safe)
MIN_CHUNK = 64           # split granule: a 512-key context uses 8 splits, a 64-key one 1
HEAD_DIMS = (64, 128, 256)
_GLU_KIND = {"swiglu": 0, "silu": 0, "geglu": 1, "gelu_tanh": 1}


def _norm_threads(n: int) -> int:
    t = 32
    while t < 1024 and t * 8 < n:
        t *= 2
    return t


def _rows(x, n: int, name: str) -> int:
    check(x, np.float32, None, name)
    if x.shape[-1] != n:
        raise ValueError(f"{name}: last dim {x.shape[-1]}, expected {n}")
    return x.size // n


def rms_norm(lib, x, w, out, eps: float, *, stream=None) -> None:
    """out = x / sqrt(mean(x^2, -1) + eps) * w over the last axis (n = w.size); out may alias x."""
    n = int(w.shape[0])
    check(w, np.float32, (n,), "w")
    r = _rows(x, n, "x")
    check(out, np.float32, x.shape, "out")
    launch(lib.fn("rms_norm"), (r,), (_norm_threads(n),),
           (x, w, out, NULL, np.int32(n), np.float32(eps), np.int32(0)), stream)


def rms_norm_add(lib, x, w, residual, eps: float, *, stream=None) -> None:
    """residual += rms_norm(x) * w (gemma's post-attention / post-FFN norms)."""
    n = int(w.shape[0])
    check(w, np.float32, (n,), "w")
    r = _rows(x, n, "x")
    check(residual, np.float32, x.shape, "residual")
    launch(lib.fn("rms_norm"), (r,), (_norm_threads(n),),
           (x, w, NULL, residual, np.int32(n), np.float32(eps), np.int32(2)), stream)


def _rope_scalars(hd: int, *, base: float, mode: str, rope_dim: int | None, freq_scale: float, freq_factors,
                  scaling) -> tuple:
    """The rope kernels' trailing arguments (rope_dim, base, freq_scale, freq_factors, ext_factor,
    corr_low, corr_high, mscale, neox), validated."""
    rd = hd if rope_dim is None else int(rope_dim)
    if rd % 2 or rd > hd or rd > 256:
        raise ValueError(f"rope_dim {rd} must be even and <= head size {hd} (and <= 256)")
    if mode not in ("norm", "neox"):
        raise ValueError(f"rope mode {mode!r}: expected 'norm' or 'neox'")
    ext, low, high, mscale, fs = 0.0, 0.0, 0.0, 1.0, float(freq_scale)
    if scaling is not None:
        fs = float(scaling.freq_scale)
        if scaling.kind == "yarn":
            from aircupy.reference.ops import _yarn_corr_dim  # same ramp ends as the numpy twin
            low = max(0.0, math.floor(_yarn_corr_dim(rd, scaling.orig_ctx, scaling.yarn_beta_fast, base)))
            high = min(rd - 1.0, math.ceil(_yarn_corr_dim(rd, scaling.orig_ctx, scaling.yarn_beta_slow, base)))
            ext = float(scaling.yarn_ext_factor)
            mscale = float(scaling.attn_factor) * ((1.0 + 0.1 * math.log(1.0 / fs)) if ext != 0.0 else 1.0)
    if freq_factors is not None:
        check(freq_factors, np.float32, None, "freq_factors")
        if freq_factors.size < rd // 2:
            raise ValueError("freq_factors shorter than rope_dim / 2")
    return (np.int32(rd), np.float32(base), np.float32(fs), NULL if freq_factors is None else freq_factors,
            np.float32(ext), np.float32(low), np.float32(high), np.float32(mscale),
            np.int32(1 if mode == "neox" else 0))


def rope_kv_store(lib, q, k, v, ck, cv, pos, seq=None, *, slots=None, base: float, mode: str,
                  rope_dim: int | None = None, freq_scale: float = 1.0, freq_factors=None, scaling=None,
                  stream=None) -> None:
    """Rotate q and k in place and store k, v into the caches, in one launch: q (T, H, hd), k and v
    (T, Hkv, hd) fp32; slab caches fp16 (n_seq, Hkv, n_ctx, hd) or (Hkv, n_ctx, hd) at [seq[t], :,
    pos[t]]; or with `slots` int32 (T,) paged caches (num_blocks, Hkv, bs, hd) at slot slots[t]
    (negative: skipped). Numpy twins: reference/ops.rope_kv_store, reference/paged_kv.PagedKVCache.write."""
    ns, hkv, n_ctx, hd = _cache_dims(ck, "cache_k")
    if _cache_dims(cv, "cache_v") != (ns, hkv, n_ctx, hd):
        raise ValueError("cache_k and cache_v differ in shape")
    check(q, np.float32, None, "q")
    t, h, qhd = (int(s) for s in q.shape)
    if qhd != hd:
        raise ValueError(f"q head size {qhd}, cache {hd}")
    check(k, np.float32, (t, hkv, hd), "k")
    check(v, np.float32, (t, hkv, hd), "v")
    check(pos, np.int32, (t,), "pos")
    if seq is not None:
        check(seq, np.int32, (t,), "seq")
    if slots is not None:
        check(slots, np.int32, (t,), "slots")
        _check_block_size(n_ctx)
    sc = _rope_scalars(hd, base=base, mode=mode, rope_dim=rope_dim, freq_scale=freq_scale,
                       freq_factors=freq_factors, scaling=scaling)
    launch(lib.fn("rope_kv_store"), (t,), (256,),
           (q, k, v, ck, cv, pos, NULL if seq is None else seq, NULL if slots is None else slots,
            np.int32(t), np.int32(h), np.int32(hkv),
            np.int32(hd), np.int32(n_ctx)) + sc, stream)


def _glu(lib, gate, up, out, kind: int, gate_stride: int, up_stride: int, stream) -> None:
    t, f = (int(s) for s in out.shape)
    check(out, np.float32, (t, f), "out")
    launch(lib.fn("glu"), (cdiv(t * f, 256),), (256,),
           (gate, up, out, np.int32(t), np.int32(f), np.int64(gate_stride), np.int64(up_stride),
            np.int32(kind)), stream)


def swiglu(lib, gate, up, out, *, stream=None) -> None:
    """out = silu(gate) * up, all fp32 (T, F)."""
    check(gate, np.float32, out.shape, "gate")
    check(up, np.float32, out.shape, "up")
    _glu(lib, gate, up, out, 0, out.shape[1], out.shape[1], stream)


def geglu(lib, gate, up, out, *, stream=None) -> None:
    """out = gelu_tanh(gate) * up, all fp32 (T, F)."""
    check(gate, np.float32, out.shape, "gate")
    check(up, np.float32, out.shape, "up")
    _glu(lib, gate, up, out, 1, out.shape[1], out.shape[1], stream)


def glu(lib, gate_up, out, kind: str, *, stream=None) -> None:
    """out (T, F) = act(gate_up[:, :F]) * gate_up[:, F:], kind "swiglu" or "geglu" (one fused matmul)."""
    t, f = (int(s) for s in out.shape)
    check(gate_up, np.float32, (t, 2 * f), "gate_up")
    if kind not in _GLU_KIND:
        raise ValueError(f"glu kind {kind!r}")
    _glu(lib, gate_up, gate_up[:, f:] if t else gate_up, out, _GLU_KIND[kind], 2 * f, 2 * f, stream)


def glu_quant(lib, gate_up, xq, kind: str, *, stream=None) -> None:
    """glu(gate_up (M, 2F)) written pre-quantized into xq (uint8, M * xq_row_nbytes(F), 16-byte aligned)
    for cuda_matmul.matvec_xq (the down projection): same activation values as `glu`. F % 128 == 0."""
    from aircupy.cuda.ops.matmul import xq_row_nbytes
    m, f2 = (int(s) for s in gate_up.shape)
    f = f2 // 2
    check(gate_up, np.float32, (m, 2 * f), "gate_up")
    check(xq, np.uint8, None, "xq")
    if kind not in _GLU_KIND:
        raise ValueError(f"glu kind {kind!r}")
    if f % 128 or xq.size < m * xq_row_nbytes(f) or xq.data.ptr % 16:
        raise ValueError(f"glu_quant: F {f} (needs % 128), xq {xq.size} bytes (needs {m * xq_row_nbytes(f)}, aligned)")
    launch(lib.fn("glu_quant"), (cdiv(m * f // 4, 256),), (256,),
           (gate_up, xq, np.int32(m), np.int32(f), np.int32(_GLU_KIND[kind])), stream)


def softcap(lib, x, cap: float, *, stream=None) -> None:
    """x = cap * tanh(x / cap) in place (fp32)."""
    check(x, np.float32, None, "x")
    launch(lib.fn("softcap"), (cdiv(x.size, 256),), (256,), (x, np.int64(x.size), np.float32(cap)), stream)


def take_rows(lib, src, idx, out, *, stream=None) -> None:
    """out (R, E) = src[idx] for src fp32 (N, E), idx int32 (R,) in [0, N) (not checked: device data)."""
    check(src, np.float32, None, "src")
    n, e = (int(s) for s in src.shape)
    r = int(idx.shape[0])
    check(idx, np.int32, (r,), "idx")
    check(out, np.float32, (r, e), "out")
    launch(lib.fn("take_rows"), (cdiv(r * e, 256),), (256,), (src, idx, out, np.int32(r), np.int32(e)), stream)


def _cache_dims(c, name: str) -> tuple[int, int, int, int]:
    check(c, np.float16, None, name)
    if c.ndim == 3:
        return (1,) + tuple(int(s) for s in c.shape)
    if c.ndim != 4:
        raise ValueError(f"{name}: expected (n_seq, Hkv, n_ctx, hd) or (Hkv, n_ctx, hd), got {c.shape}")
    return tuple(int(s) for s in c.shape)


def _check_block_size(bs: int) -> None:
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"a paged cache's block size must be a power of two, got {bs}")


def _tables(tables, seq, t: int, bs: int):
    """(tables arg, max_blocks) after checking a paged launch's block tables."""
    if tables is None:
        return NULL, 0
    check(tables, np.int32, None, "tables")
    if tables.ndim != 2 or not tables.flags.c_contiguous:
        raise ValueError(f"tables: expected a contiguous (n_tables, max_blocks) int32 array, got {tables.shape}")
    _check_block_size(bs)
    return tables, int(tables.shape[1])


def _decode_smem(hd: int) -> int:
    return 128 * (2 * hd + 8) * 2  # K (padded) and V tiles of 128 keys


def decode_splits(lib, t: int, h: int, hkv: int, hd: int = 128) -> int:
    """KV splits of the decode kernel: as many blocks as fit on the GPU at once (one wave: shared memory
    allows 3 blocks per SM at hd 128), over the (kv head, group, row) grid, <= MAX_SPLITS: one wave
    of longer splits beat two waves of shorter ones (bench/NOTES_kernels.md). Fixed for a launch shape; each split takes >= min_chunk keys, and blocks of splits a short context does not
    reach exit at once."""
    ngrp = cdiv(h // hkv, 8)
    per_sm = (getattr(lib, "max_smem_optin", 232448) + 1024) // (_decode_smem(hd) + 9 * 1024)  # + static
    per_sm = max(1, min(4, per_sm))
    splits = min(MAX_SPLITS, per_sm * lib.n_sm // (hkv * ngrp * t), DECODE_PARTIAL_ROWS // t)
    return max(1, splits)


# rows x splits of decode partials the scratch holds: t <= 8 rows keep every split they had; a batch's
# many decode rows split less (their rows alone fill the GPU)
DECODE_PARTIAL_ROWS = DECODE_MAX_ROWS * MAX_SPLITS


def attention_scratch_nbytes(t_max: int, h: int, hd: int) -> int:
    """Scratch bytes `attention` needs for up to t_max decode-kernel rows (prefill needs none):
    rows x splits <= max(DECODE_PARTIAL_ROWS, t_max) (decode_splits)."""
    return max(DECODE_PARTIAL_ROWS, int(t_max)) * h * (hd + 2) * 4


def attention(lib, q, ck, cv, pos, out, *, scale: float, window: int = 0, softcap: float = 0.0, seq=None,
              tables=None, scratch=None, min_chunk: int = MIN_CHUNK, kernel: str | None = None,
              stream=None) -> None:
    """Causal grouped-query attention of q (T, H, hd) fp32 over the cache; out (T, H*hd) fp32.

    Row t attends keys [max(0, pos[t] + 1 - window), pos[t]] (window 0: from 0) of sequence seq[t]
    (None: 0; with `tables`, the paged cache's block table seq[t]); this step's keys must already be
    stored (rope_kv_store). kernel "decode": split-KV decode kernel, rows independent (a batch's decode
    rows, any T), needs `scratch` (uint8, attention_scratch_nbytes); min_chunk: keys per split are a
    multiple of it (a tuning knob: any value >= 1 gives the same result). "prefill": tiled tensor-core
    kernel, every row of one sequence. None: decode for T <= 8, else prefill."""
    ns, hkv, n_ctx, hd = _cache_dims(ck, "cache_k")
    _cache_dims(cv, "cache_v")
    check(q, np.float32, None, "q")
    t, h, qhd = (int(s) for s in q.shape)
    if qhd != hd or h % hkv:
        raise ValueError(f"q {q.shape} does not match the cache (Hkv {hkv}, hd {hd})")
    if hd not in HEAD_DIMS:
        raise ValueError(f"head size {hd}: the attention kernels support {HEAD_DIMS}")
    check(pos, np.int32, (t,), "pos")
    if out.size != t * h * hd:
        raise ValueError(f"out: shape {out.shape}, expected ({t}, {h * hd})")
    check(out, np.float32, None, "out")
    seq_arg = NULL if seq is None else seq
    if seq is not None:
        check(seq, np.int32, (t,), "seq")
    tab, max_blocks = _tables(tables, seq, t, n_ctx)
    common = (np.int32(t), np.int32(h), np.int32(hkv), np.int32(n_ctx), np.int32(max_blocks))
    kernel = kernel or ("prefill" if t > DECODE_MAX_ROWS else "decode")
    if kernel not in ("decode", "prefill"):
        raise ValueError(f"kernel {kernel!r}: 'decode' or 'prefill'")
    if t == 0:
        return
    if kernel == "prefill":
        bk = 32 if hd == 256 else 64
        smem = (64 + 2 * bk) * (hd + 8) * 2
        launch(lib.fn(f"attn_prefill_hd{hd}", smem), (cdiv(t, 64), h), (128,),
               (q, ck, cv, pos, seq_arg, tab, out) + common + (np.float32(scale), np.int32(window), np.float32(softcap)),
               stream, shared_mem=smem)
        return
    ns_ = decode_splits(lib, t, h, hkv, hd)
    need = t * h * ns_ * (hd + 2) * 4
    if scratch is None or scratch.size < need:
        raise ValueError(f"attention decode needs scratch of {need} bytes")
    part_o = scratch[:t * h * ns_ * hd * 4].view(np.float32)
    part_ml = scratch[t * h * ns_ * hd * 4:need].view(np.float32)
    if min_chunk < 1:
        raise ValueError(f"min_chunk {min_chunk} must be >= 1")
    ngrp = cdiv(h // hkv, 8)
    smem = _decode_smem(hd)
    launch(lib.fn(f"attn_decode_hd{hd}", smem), (hkv * ngrp, ns_, t), (128,),
           (q, ck, cv, pos, seq_arg, tab, part_o, part_ml, out) + common +
           (np.int32(ns_), np.int32(min_chunk), np.float32(scale), np.int32(window), np.float32(softcap)),
           stream, shared_mem=smem)
    # combine: one thread per split for the weights (blockDim >= MAX_SPLITS), then over dims
    launch(lib.fn("attn_combine"), (t * h,), (max(MAX_SPLITS, min(hd, 256)),),
           (part_o, part_ml, out, pos, np.int32(t * h), np.int32(h), np.int32(hd), np.int32(ns_),
            np.int32(min_chunk), np.int32(window)), stream)
