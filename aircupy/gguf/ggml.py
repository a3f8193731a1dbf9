"""ggml tensor types: ids as stored in GGUF and their block geometry.

A quantized tensor is a sequence of blocks along its innermost (row) dimension; each block holds
`block_elems` values in `block_bytes` bytes. The row length must be a multiple of `block_elems`.
Geometry is known for every type ggml defines, so the reader can validate any file; numpy
dequantization (quants.py) exists for the types aircupy computes with (SUPPORTED_COMPUTE).
"""
from __future__ import annotations

import enum


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# type -> (elements per block, bytes per block)
BLOCK_GEOMETRY: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24), GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50), GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82), GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56),
    GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66), GGMLType.MXFP4: (32, 17),
}

# Types with a numpy dequantizer (quants.py) and, later, CUDA kernels.
SUPPORTED_COMPUTE = frozenset({
    GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
    GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K,
    GGMLType.Q6_K,
})


def type_name(t: int) -> str:
    """'Q4_K' for 12; 'unknown(99)' for an id ggml does not define."""
    try:
        return GGMLType(t).name
    except ValueError:
        return f"unknown({t})"


def row_nbytes(t: GGMLType, n_elems: int) -> int:
    """Bytes of one row of `n_elems` values; raises ValueError if n_elems is not a whole number of blocks."""
    be, bb = BLOCK_GEOMETRY[GGMLType(t)]
    if n_elems % be:
        raise ValueError(f"{GGMLType(t).name} row of {n_elems} values is not a multiple of {be}")
    return n_elems // be * bb


def tensor_nbytes(t: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy-order `shape` (last axis = row)."""
    if not shape:
        return row_nbytes(t, 1)
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows * row_nbytes(t, int(shape[-1]))
