"""Random, valid block bytes for every ggml type aircupy computes with (quants tests, kernel tests).

Every bit pattern of the quant bytes (qs, qh, hmask, packed scales) is a valid block; only the f16
scale fields need care, so they get finite values. The field offsets below are written out here on
purpose, independently of aircupy/gguf/quants.py, from ggml-common.h.

    random_blocks(ggml_type, n_rows, n_cols, rng) -> uint8 (n_rows, row_nbytes)

scales="realistic": f16 scales log-uniform in +-[2^-12, 2^-5], float types ~ N(0, 0.05^2): values of
  the magnitude real weights have, so kernel tests can use ordinary relative tolerances.
scales="any": every finite f16 (or f32 / bf16) bit pattern, zeros, subnormals and +-65504 included.
extremes=True: about half of the blocks get all their quant bytes set to 0x00 or 0xFF, the ends of
  every quant range (and, for K-quants, of the packed sub-block scales and mins).
"""
from __future__ import annotations

import numpy as np

from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType, row_nbytes

# Byte offsets of the f16 fields (d, and m / dmin where present) inside one block.
F16_FIELDS: dict[GGMLType, tuple[int, ...]] = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),   # scales[16] qs[64] d dmin
    GGMLType.Q3_K: (108,),     # hmask[32] qs[64] scales[12] d
    GGMLType.Q4_K: (0, 2),     # d dmin scales[12] qs[128]
    GGMLType.Q5_K: (0, 2),     # d dmin scales[12] qh[32] qs[128]
    GGMLType.Q6_K: (208,),     # ql[128] qh[64] scales[16] d
}
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
ALL_TYPES = FLOAT_TYPES + tuple(F16_FIELDS)

# f16 bit patterns worth hitting on purpose: +-0, smallest subnormal, largest subnormal,
# smallest normal, 1.0, -2.0, +-65504 (largest finite).
SPECIAL_F16 = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xC000, 0x7BFF, 0xFBFF],
                       dtype=np.uint16)


def _finite_bits(rng: np.random.Generator, n: int, bits: int, exp_mask: int) -> np.ndarray:
    """n random bit patterns of a `bits`-wide float whose exponent (exp_mask) is not all ones."""
    dt = {16: np.uint16, 32: np.uint32}[bits]
    v = rng.integers(0, 1 << bits, size=n, dtype=np.uint64).astype(dt)
    inf_or_nan = (v & dt(exp_mask)) == dt(exp_mask)
    v[inf_or_nan] ^= dt(1 << (bits - 2))  # clear the exponent's top bit: now finite
    return v


def random_f16(rng: np.random.Generator, n: int, scales: str = "realistic") -> np.ndarray:
    """n finite float16 values (see the module docstring for `scales`)."""
    if scales == "realistic":
        mag = np.exp2(rng.uniform(-12, -5, size=n))
        return (mag * rng.choice([-1.0, 1.0], size=n)).astype(np.float16)
    if scales == "any":
        v = _finite_bits(rng, n, 16, 0x7C00)
        k = min(n, SPECIAL_F16.size)
        v[rng.choice(n, size=k, replace=False)] = SPECIAL_F16[:k]
        return v.view(np.float16)
    raise ValueError(f"scales must be 'realistic' or 'any', not {scales!r}")


def _float_values(t: GGMLType, n: int, rng: np.random.Generator, scales: str) -> np.ndarray:
    if scales == "realistic":
        x = (rng.standard_normal(n) * 0.05).astype(np.float32)
        if t == GGMLType.F32:
            return x.view(np.uint8)
        if t == GGMLType.F16:
            return x.astype(np.float16).view(np.uint8)
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bf16 by truncation
    if scales != "any":
        raise ValueError(f"scales must be 'realistic' or 'any', not {scales!r}")
    if t == GGMLType.F32:
        return _finite_bits(rng, n, 32, 0x7F800000).view(np.uint8)
    if t == GGMLType.F16:
        return random_f16(rng, n, "any").view(np.uint8)
    return _finite_bits(rng, n, 16, 0x7F80).view(np.uint8)  # bf16: f32's exponent field


def random_blocks(ggml_type: int, n_rows: int, n_cols: int, rng: np.random.Generator, *,
                  scales: str = "realistic", extremes: bool = False) -> np.ndarray:
    """uint8 (n_rows, row_nbytes(ggml_type, n_cols)): the bytes of a valid random tensor."""
    t = GGMLType(ggml_type)
    nbytes = row_nbytes(t, n_cols)
    if t in FLOAT_TYPES:
        return _float_values(t, n_rows * n_cols, rng, scales).reshape(n_rows, nbytes)
    if t not in F16_FIELDS:
        raise ValueError(f"no block generator for {t.name}")
    block_bytes = BLOCK_GEOMETRY[t][1]
    n_blocks = n_rows * nbytes // block_bytes
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    fields = F16_FIELDS[t]
    quant = np.ones(block_bytes, dtype=bool)
    for off in fields:
        quant[off:off + 2] = False
    if extremes:
        kind = rng.integers(0, 4, size=n_blocks)  # 0: all 0x00, 1: all 0xFF, else random
        blocks[np.ix_(kind == 0, quant)] = 0x00
        blocks[np.ix_(kind == 1, quant)] = 0xFF
    for off in fields:
        blocks[:, off:off + 2] = random_f16(rng, n_blocks, scales).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, nbytes)
