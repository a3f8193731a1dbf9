"""Random but valid ggml blocks at a chosen weight scale, produced fast enough to write 40 GB in seconds.

A block of random bytes is already a valid quantized block except for its float16 scale fields
(`d`, `dmin`), which random bytes would make NaN, inf or huge. So a pool of random blocks is made
once per (type, scale), the scale fields are overwritten with small finite values, and tensors are
written as slices of that pool starting at random block-aligned offsets (wrapping around). The pool is
a few tens of MB; the file can be any size.

Scale choice: each tensor asks for a weight RMS `std` (e.g. 1/sqrt(K) for a (N, K) matrix, so that
x @ W.T keeps unit-RMS activations unit-RMS, which keeps a deep random model finite in fp16). For
each type, UNIT_RMS is the RMS of the dequantized weights when d = 1 with uniform random quants and
sub-block scales (derived below), so d = std / UNIT_RMS, jittered +-50% per block like real files.
For types with a min (`dmin`), dmin is set so the weights' mean is ~0.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType

POOL_BYTES = 32 << 20  # largest pool per (type, scale); bigger tensors repeat it at shifted offsets
CHUNK_BYTES = 16 << 20  # write size

# RMS of dequantized weights with d = 1, uniform random bytes (q uniform over its range), and
# dmin = DMIN_RATIO * d. Derivations (E = mean over uniform q, sub-block scale sc and min m):
#   Q4_0 d*(q-8), q in 0..15:                     sqrt(E[(q-8)^2]) = sqrt(21.5)         = 4.64
#   Q4_1 d*q + m, m = -7.5d:                      sqrt(var q) = sqrt(21.25)             = 4.61
#   Q5_0 d*(q-16), q in 0..31:                    sqrt(85.25 + 0.25)                    = 9.25
#   Q5_1 d*q + m, m = -15.5d:                     sqrt(85.25)                           = 9.23
#   Q8_0 d*q, q int8:                             sqrt(5461.25 + 0.25)                  = 73.9
#   Q2_K d*(sc&15)*q - dmin*(sc>>4), q in 0..3, dmin = 1.5d:   sqrt(192.5)              = 13.9
#   Q3_K d*(sc-32)*v, sc 6-bit, v in -4..3:       sqrt(341.5 * 5.5)                     = 43.3
#   Q4_K d*sc*q - dmin*m, sc, m 6-bit, q 0..15, dmin = 7.5d:  sqrt(73395)              = 270.9
#   Q5_K same with q in 0..31, dmin = 15.5d:      sqrt(277651)                          = 526.9
#   Q6_K d*sc*(q-32), sc int8, q 0..63:           sqrt(5461.5 * 341.5)                  = 1365.7
UNIT_RMS = {
    GGMLType.Q4_0: 4.64, GGMLType.Q4_1: 4.61, GGMLType.Q5_0: 9.25, GGMLType.Q5_1: 9.23,
    GGMLType.Q8_0: 73.9, GGMLType.Q2_K: 13.9, GGMLType.Q3_K: 43.3, GGMLType.Q4_K: 270.9,
    GGMLType.Q5_K: 526.9, GGMLType.Q6_K: 1365.7,
}
# Byte offsets of the float16 fields in each block layout (ggml-common.h): (d, dmin or m or None).
SCALE_FIELDS = {
    GGMLType.Q4_0: (0, None), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0, None),
    GGMLType.Q5_1: (0, 2), GGMLType.Q8_0: (0, None), GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108, None), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208, None),
}
# Second f16 field relative to d: the additive min m of Q4_1/Q5_1 (w = d*q + m, so negative to
# center), or the K-quants' dmin (w = d*sc*q - dmin*m, so positive).
DMIN_RATIO = {GGMLType.Q4_1: -7.5, GGMLType.Q5_1: -15.5, GGMLType.Q2_K: 1.5,
              GGMLType.Q4_K: 7.5, GGMLType.Q5_K: 15.5}
FLOAT_TYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}
SYNTH_TYPES = frozenset(UNIT_RMS) | frozenset(FLOAT_TYPES)


def _fix_scales(blocks: np.ndarray, t: GGMLType, std: float, rng: np.random.Generator) -> None:
    """Overwrite the f16 scale fields of `blocks` (n_blocks, block_bytes) uint8, in place.
    Q4_1/Q5_1 store the min m itself (w = d*q + m), K-quants store dmin (w = d*sc*q - dmin*m)."""
    d_off, m_off = SCALE_FIELDS[t]
    n = blocks.shape[0]
    d = (std / UNIT_RMS[t]) * rng.uniform(0.5, 1.5, n)
    blocks[:, d_off:d_off + 2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
    if m_off is not None:
        m = d * DMIN_RATIO[t]
        blocks[:, m_off:m_off + 2] = m.astype("<f2").view(np.uint8).reshape(n, 2)


class BlockPool:
    """Random valid blocks of one quantized type at one scale; serves any tensor size by tiling."""

    def __init__(self, t: GGMLType, std: float, nbytes_hint: int, rng: np.random.Generator):
        if t not in SYNTH_TYPES:
            raise ValueError(f"no synthetic blocks for {t.name}")
        self.type = t
        _, bb = BLOCK_GEOMETRY[t]
        n_blocks = max(1, min(POOL_BYTES, nbytes_hint) // bb)
        if t in FLOAT_TYPES:  # a "block" is one value: a pool of normals at the asked RMS
            raw = float_tensor(t, (n_blocks,), 0.0, std, rng)
        else:
            raw = np.frombuffer(bytearray(rng.bytes(n_blocks * bb)), dtype=np.uint8)
            _fix_scales(raw.reshape(n_blocks, bb), t, std, rng)
        self.data = raw
        self.block_bytes = bb
        self.rng = rng

    def chunks(self, nbytes: int) -> Iterator[memoryview]:
        """Yield `nbytes` (a whole number of blocks) as views of the pool, starting at a random
        block and wrapping; each view is at most CHUNK_BYTES."""
        assert nbytes % self.block_bytes == 0
        mv = memoryview(self.data)
        size = len(self.data)
        pos = int(self.rng.integers(0, size // self.block_bytes)) * self.block_bytes
        left = nbytes
        while left:
            n = min(left, size - pos, CHUNK_BYTES)
            yield mv[pos:pos + n]
            left -= n
            pos = (pos + n) % size


def float_tensor(t: GGMLType, shape: tuple[int, ...], mean: float, std: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A small F32/F16 tensor (norm weights, biases, or an F16 matrix) as little-endian bytes."""
    x = rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * std + mean
    return x.astype(np.dtype(FLOAT_TYPES[t]).newbyteorder("<")).view(np.uint8)
