"""Weight tables: a layer's (or the globals') device views, bound to wherever its block lives.

    table = bind(layout, block)      # block: cupy uint8 array of layout.nbytes (pool region or slot)

A table names every weight the forward pass uses; matrices are QWeight (packed bytes + type + (N, K)),
vectors float32 cupy arrays, absent roles None. Resident layers are bound once to their pool regions;
a streaming slot is bound once per layer layout and the pass swaps tables, not code. The forward pass
gets its tables from a weight source (begin_pass / acquire / release / end_pass / abort):
ResidentWeights here, StreamedWeights (cuda/streamed.py) when layers stream.

Every upload path (the staged load, cuda/load.py, and a streamed slot's fill) converts vectors with
vector_values and repacks with repack_source, so a block's bytes do not depend on the path.
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


def vector_values(p, raw) -> np.ndarray:
    """A vector piece's float32 values (p.shape[0],): each source tensor dequantized and placed at its
    rows, zeros elsewhere (a bias only some of q/k/v carry). raw: tensor name -> (bytes, ggml type,
    shape), the source's bytes as stored in the file. The one conversion of vectors: the staged load,
    the streamed slots and the tests' reference upload all use it."""
    out = np.zeros(p.shape[0], dtype=np.float32)
    for name, row0 in p.sources:
        data, t, shape = raw[name]
        v = dequantize(data, t, shape).reshape(-1)
        out[row0:row0 + v.size] = v
    return out


def repack_source(lib, stage, dst, piece, ggml_type, src_shape, row0: int, stream) -> None:
    """ops.repack of one source tensor (its raw bytes in device `stage`) into its rows of `piece`
    (device `dst`, the piece's bytes) on `stream`: the one repack call of every upload path."""
    from aircupy.cuda import ops
    if len(piece.sources) == 1:
        ops.repack(lib, stage, dst, ggml_type, src_shape, stream=stream)
    else:
        ops.repack(lib, stage, dst, ggml_type, src_shape, row0=row0, dst_rows=piece.shape[0],
                   stream=stream)


def direct_offset(piece, row0: int) -> int:
    """Byte offset in `piece` of row `row0`, for types the kernels read as stored (no repack)."""
    return row0 * row_nbytes(piece.ggml_type, piece.shape[1])


class ResidentWeights:
    """The weight source of layers that live in the pool: the forward pass's acquire(i) is a lookup.
    The streamed source (cuda/streamed.py StreamedWeights) answers the same five calls."""

    def __init__(self, tables: list[WeightTable]):
        self.tables = tables

    def begin_pass(self, kv) -> None:
        pass

    def acquire(self, i: int) -> WeightTable:
        return self.tables[i]

    def release(self, i: int) -> None:
        pass

    def end_pass(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
