"""Numpy dequantization of ggml tensor types: the reference the CUDA kernels are tested against.

`dequantize(data, ggml_type, shape)` is the single entry point. It turns the raw bytes of a tensor
into float32 values of numpy-order `shape` (last axis = one row, a whole number of blocks), bit-exact
with ggml's dequantize_row_* and with gguf-py's numpy port (the test oracle).

Every block format is written twice: as a packed numpy structured dtype (Q4_0_BLOCK ...: the byte
offsets, read straight off ggml-common.h) and as a function that fills float32 (n_blocks,
block_elems) from an array of such blocks, vectorised over all blocks. Float arithmetic keeps ggml's order of
operations (e.g. `d * q + m`, never `m + q * d` or a fused multiply-add) so the results match to the
bit. This file holds the float and legacy 32-element formats; kquants.py the 256-element K-quants.
"""
from __future__ import annotations

import numpy as np

from aircupy.errors import UnsupportedModelError
from aircupy.gguf import kquants
from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType, tensor_nbytes, type_name

# Values per vectorised step (1 MiB of float32 out): small enough that one step's temporaries stay
# in cache and a 262k x 640 embedding needs no scratch beyond its output, large enough that the
# ~20 numpy calls per step of a K-quant cost little.
_CHUNK_VALUES = 1 << 18

F16 = np.dtype("<f2")


def _f32(half: np.ndarray) -> np.ndarray:
    """(n,) f16 field -> (n, 1) float32, ready to broadcast over a block's values (exact widening)."""
    return half.astype(np.float32)[:, None]


def _nibbles_into(qs: np.ndarray, out: np.ndarray) -> None:
    """(n, 16) packed bytes -> out (n, 32): the 16 low nibbles, then the 16 high nibbles.

    This is the legacy formats' element order: byte j holds element j (low) and element j + 16 (high).
    """
    halves = out.reshape(-1, 2, 16)
    halves[:, 0] = qs & 0x0F
    halves[:, 1] = qs >> 4


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) uint8: bit j (0 or 1) of that uint32."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


# ---------------------------------------------------------------------------------------------------
# Every dequantizer fills `out`, float32 (n_blocks, block_elems), from `b`, (n_blocks,) blocks. It
# writes in place rather than returning a new array: fresh temporaries of a few hundred KiB cost a
# page fault per 4 KiB and made whole-model dequantization 3-4x slower.
#
# Float formats. One "block" is one value.

def _dequant_f32(b: np.ndarray, out: np.ndarray) -> None:
    # Little-endian IEEE binary32, copied so the result never aliases the (read-only) file mapping.
    out[:, 0] = b.view("<f4")


def _dequant_f16(b: np.ndarray, out: np.ndarray) -> None:
    # Little-endian IEEE binary16; the widening to float32 is exact.
    out[:, 0] = b.view(F16)


def _dequant_bf16(b: np.ndarray, out: np.ndarray) -> None:
    # bfloat16 = the top 16 bits of a binary32: shift the uint16 into the high half, reinterpret.
    out.view(np.uint32)[:, 0] = b.astype(np.uint32) << 16


# ---------------------------------------------------------------------------------------------------
# Legacy formats: 32 values per block, one f16 scale `d` (and for the _1 types an f16 offset `m`).

Q4_0_BLOCK = np.dtype([("d", F16), ("qs", np.uint8, 16)])  # 18 bytes


def _dequant_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    # block_q4_0, 18 bytes:  [0:2] d f16 | [2:18] qs, 16 bytes of 4-bit quants.
    # qs[j] & 0xF is element j, qs[j] >> 4 is element j + 16 (j < 16).
    # Quants are unsigned 0..15 with an implicit offset of 8:  y = d * (q - 8).
    _nibbles_into(b["qs"], out)
    out -= 8.0  # exact: small integers
    out *= _f32(b["d"])


Q4_1_BLOCK = np.dtype([("d", F16), ("m", F16), ("qs", np.uint8, 16)])  # 20 bytes


def _dequant_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    # block_q4_1, 20 bytes:  [0:2] d f16 | [2:4] m f16 (the block minimum) | [4:20] qs.
    # Nibble order as Q4_0; quants are unsigned 0..15:  y = d * q + m  (multiply, round, add, round).
    _nibbles_into(b["qs"], out)
    out *= _f32(b["d"])
    out += _f32(b["m"])


Q5_0_BLOCK = np.dtype([("d", F16), ("qh", np.uint8, 4), ("qs", np.uint8, 16)])  # 22 bytes


def _dequant_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    # block_q5_0, 22 bytes:  [0:2] d f16 | [2:6] qh, a little-endian uint32 | [6:22] qs.
    # Element j (0..31) has its low 4 bits in qs as in Q4_0 and its 5th bit in bit j of qh.
    # Quants are unsigned 0..31 with an implicit offset of 16:  y = d * (q - 16).
    # qh is only 2-byte aligned in the file: read it as bytes, never as one uint32 load.
    _nibbles_into(b["qs"], out)
    out += _high_bits(b["qh"]) << 4
    out -= 16.0  # exact: small integers
    out *= _f32(b["d"])


Q5_1_BLOCK = np.dtype([("d", F16), ("m", F16), ("qh", np.uint8, 4), ("qs", np.uint8, 16)])  # 24 B


def _dequant_q5_1(b: np.ndarray, out: np.ndarray) -> None:
    # block_q5_1, 24 bytes:  [0:2] d f16 | [2:4] m f16 | [4:8] qh uint32 LE | [8:24] qs.
    # Bits as Q5_0; quants are unsigned 0..31:  y = d * q + m.
    _nibbles_into(b["qs"], out)
    out += _high_bits(b["qh"]) << 4
    out *= _f32(b["d"])
    out += _f32(b["m"])


Q8_0_BLOCK = np.dtype([("d", F16), ("qs", np.int8, 32)])  # 34 bytes


def _dequant_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    # block_q8_0, 34 bytes:  [0:2] d f16 | [2:34] qs, 32 signed int8 quants in element order.
    # y = d * q  (-128..127; the quantizer never writes -128, but it decodes like any other value).
    np.multiply(b["qs"], _f32(b["d"]), out=out)


# type -> (block dtype, dequantizer). Float types use a plain scalar dtype: one value per "block".
_FORMATS: dict[GGMLType, tuple[np.dtype, object]] = {
    GGMLType.F32: (np.dtype("<u4"), _dequant_f32),
    GGMLType.F16: (np.dtype("<u2"), _dequant_f16),
    GGMLType.BF16: (np.dtype("<u2"), _dequant_bf16),
    GGMLType.Q4_0: (Q4_0_BLOCK, _dequant_q4_0),
    GGMLType.Q4_1: (Q4_1_BLOCK, _dequant_q4_1),
    GGMLType.Q5_0: (Q5_0_BLOCK, _dequant_q5_0),
    GGMLType.Q5_1: (Q5_1_BLOCK, _dequant_q5_1),
    GGMLType.Q8_0: (Q8_0_BLOCK, _dequant_q8_0),
    **kquants.FORMATS,
}


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor bytes -> a new float32 array of numpy-order `shape`.

    data: the tensor's bytes (any shape; any dtype is reinterpreted as bytes), exactly
    tensor_nbytes(ggml_type, shape) of them. shape: numpy order, last axis = one row of whole blocks.
    Raises UnsupportedModelError for a type without a dequantizer or a row that is not a whole number
    of blocks, ValueError when the byte count does not match the shape.
    """
    try:
        t = GGMLType(int(ggml_type))
    except ValueError:
        t = None
    if t not in _FORMATS:
        raise UnsupportedModelError(
            f"no dequantizer for ggml type {type_name(int(ggml_type))}; supported: "
            + ", ".join(sorted(f.name for f in _FORMATS)))
    shape = tuple(int(s) for s in shape)
    block_elems, block_bytes = BLOCK_GEOMETRY[t]
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    row = shape[-1] if shape else 1
    if row % block_elems:
        raise UnsupportedModelError(
            f"{t.name} tensor of shape {shape}: row length {row} is not a multiple of the "
            f"{block_elems}-value block")
    want = tensor_nbytes(t, shape)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if raw.size != want:
        raise ValueError(f"{t.name} tensor of shape {shape} needs {want} bytes, got {raw.size}")

    block_dtype, fn = _FORMATS[t]
    assert block_dtype.itemsize == block_bytes, t  # the dtype tables must agree with ggml.py
    blocks = raw.view(block_dtype)
    out = np.empty((blocks.size, block_elems), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // block_elems)
    for start in range(0, blocks.size, step):
        fn(blocks[start:start + step], out[start:start + step])
    return out.reshape(shape)
