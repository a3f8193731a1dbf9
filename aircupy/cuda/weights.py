"""Weight tables: a layer's (or the globals') device views, bound to wherever its block lives.

    table = bind(layout, block)      # block: cupy uint8 array of layout.nbytes (pool region or slot)
    fill(layout, block, tensors, lib, staging)   # raw GGUF bytes -> packed device layout

A table names every weight the forward pass uses; matrices are QWeight (packed bytes + type + (N, K)),
vectors float32 cupy arrays, absent roles None. Resident models bind each layer once to its pool
region; the streaming model binds each slot once per layer layout and swaps tables, not code.

The models load through model/staged_fill.py (sequential pinned reads overlapped with the uploads,
issue 5); fill is the per-tensor path it replaced, kept as the reference the GPU test
(tests/gpu/test_cold_load.py) compares the staged load's bytes with.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from aircupy.gguf.ggml import row_nbytes
from aircupy.gguf.quants import dequantize
from aircupy.cuda.layout import BlockLayout


@dataclass
class WeightTable:
    """One layer's weights (the globals use token_embd/output/output_norm/rope_freqs)."""
    attn_norm: object = None
    qkv: object = None
    q: object = None
    k: object = None
    v: object = None
    b_qkv: object = None
    b_q: object = None
    b_k: object = None
    b_v: object = None
    q_norm: object = None
    k_norm: object = None
    wo: object = None
    bo: object = None
    post_attn_norm: object = None
    ffn_norm: object = None
    gate_up: object = None
    gate: object = None
    up: object = None
    down: object = None
    post_ffn_norm: object = None
    token_embd: object = None
    output: object = None
    output_norm: object = None
    rope_freqs: object = None


_ROLES = {f.name for f in fields(WeightTable)}


def bind(layout: BlockLayout, block) -> WeightTable:
    """Views of every piece of `layout` inside `block` (uint8 cupy array, >= layout.nbytes)."""
    from aircupy.cuda.ops.packing import QWeight

    assert block.dtype == np.uint8 and block.size >= layout.nbytes
    table = WeightTable()
    for p in layout.pieces.values():
        assert p.role in _ROLES, p.role
        raw = block[p.offset:p.offset + p.nbytes]
        if p.is_matrix:
            setattr(table, p.role, QWeight(raw, p.ggml_type, p.shape))
        else:
            setattr(table, p.role, raw.view(np.float32))
    return table


def _host_vector(p, tensors) -> np.ndarray:
    """The piece's float32 values: its sources dequantized and placed at their rows (zeros elsewhere)."""
    out = np.zeros(p.shape[0], dtype=np.float32)
    for name, row0 in p.sources:
        info = tensors[name]
        v = dequantize(info.data, info.ggml_type, info.shape).reshape(-1)
        out[row0:row0 + v.size] = v
    return out


def fill(layout: BlockLayout, block, tensors, lib, staging, stream) -> int:
    """Upload every piece of `layout` from the file into `block`; returns bytes read from the file.

    Types the kernels read as stored go straight from the mmap to their rows; types that need the
    packed layout go through `staging` (device uint8, >= the largest such tensor) and ops.repack.
    Every copy and repack is ordered on `stream` (a copy from pageable memory returns once the bytes
    are staged, so the host buffer is free; the next copy into `staging` waits for the repack before
    it in stream order). The stream is synchronized once at the end."""
    from aircupy.cuda import ops
    from aircupy.cuda.ops.packing import needs_repack

    read = 0
    for p in layout.pieces.values():
        dst = block[p.offset:p.offset + p.nbytes]
        if not p.is_matrix:
            host = _host_vector(p, tensors)
            dst[:host.nbytes].view(np.float32).set(host, stream=stream)
            read += sum(tensors[n].nbytes for n, _ in p.sources)
            continue
        t, (n_rows, k) = p.ggml_type, p.shape
        for name, row0 in p.sources:
            info = tensors[name]
            src = np.ascontiguousarray(info.data)
            read += src.nbytes
            if not needs_repack(t):
                off = row0 * row_nbytes(t, k)
                dst[off:off + src.nbytes].data.copy_from_host_async(src.ctypes.data, src.nbytes,
                                                                    stream)
                continue
            stage = staging[:src.nbytes]
            stage.data.copy_from_host_async(src.ctypes.data, src.nbytes, stream)
            with stream:
                if len(p.sources) == 1:
                    ops.repack(lib, stage, dst, t, info.shape)
                else:
                    ops.repack(lib, stage, dst, t, info.shape, row0=row0, dst_rows=n_rows)
    stream.synchronize()
    return read
