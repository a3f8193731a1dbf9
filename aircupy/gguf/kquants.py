"""K-quant formats: 256-value super-blocks split into sub-blocks that each carry a small scale.

Same contract as the legacy formats in quants.py (which re-exports FORMATS): a packed structured
dtype per block, read off ggml-common.h, and a function (n_blocks,) -> (n_blocks, 256) float32 that
keeps ggml's order of float operations, so the results are bit-exact with dequantize_row_q*_K.

A shared element order: several formats pack 2-bit planes as "a 32-byte group, four shifts".
Byte l of group g holds element g*128 + s*32 + l in bits 2s..2s+1 (s = 0..3); in words, each
128-value half reads its 32 bytes four times, shifting by 0, 2, 4, 6. Nibble planes work the same
way with shifts 0 and 4, and 1-bit planes (hmask / qh) with shifts 0..7 over one 32-byte group.
"""
from __future__ import annotations

import numpy as np

from aircupy.gguf.ggml import GGMLType

QK_K = 256
F16 = np.dtype("<f2")


def _planes(packed: np.ndarray, n_groups: int, group_bytes: int, bits: int) -> np.ndarray:
    """Unpack bit planes in the order above.

    packed (n, n_groups * group_bytes) uint8 -> (n, n_groups * (8 // bits) * group_bytes) uint8 with
    element g * (8 // bits) * group_bytes + s * group_bytes + l = (packed[g*group_bytes + l] >> s*bits)
    & (2^bits - 1).
    """
    n = packed.shape[0]
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    q = packed.reshape(n, n_groups, 1, group_bytes) >> shifts
    return (q & np.uint8((1 << bits) - 1)).reshape(n, -1)


def _f32(half: np.ndarray) -> np.ndarray:
    """(n,) f16 field -> (n, 1) float32 (exact widening)."""
    return half.astype(np.float32)[:, None]


# Each dequantizer fills `out`, float32 (n_blocks, 256), from `b`, (n_blocks,) blocks, in place
# (see quants.py for why). Sub-block scales are multiplied out first, `d * sc` rounded to float32,
# then applied to the quants, as ggml does.

Q2_K_BLOCK = np.dtype([("scales", np.uint8, 16), ("qs", np.uint8, 64), ("d", F16), ("dmin", F16)])


def _dequant_q2_k(b: np.ndarray, out: np.ndarray) -> None:
    # block_q2_K, 84 bytes:  [0:16] scales | [16:80] qs | [80:82] d f16 | [82:84] dmin f16.
    # 16 sub-blocks of 16 values; scales[i] & 0xF is sub-block i's scale, scales[i] >> 4 its min.
    # qs: 2-bit quants (0..3), two groups of 32 bytes, shifts 0/2/4/6 (module docstring).
    # y = (d * sc) * q - (dmin * m).
    sc = b["scales"]
    y = out.reshape(-1, 16, 16)
    y[...] = _planes(b["qs"], 2, 32, 2).reshape(y.shape)
    y *= (_f32(b["d"]) * (sc & 0x0F))[:, :, None]
    y -= (_f32(b["dmin"]) * (sc >> 4))[:, :, None]


Q3_K_BLOCK = np.dtype([("hmask", np.uint8, 32), ("qs", np.uint8, 64), ("scales", np.uint8, 12),
                       ("d", F16)])


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """(n, 12) packed bytes -> (n, 16) int8 signed scales, -32..31.

    16 6-bit values: the low 4 bits of scale i are byte i & 0xF for i < 8, byte i-8 >> 4 for i >= 8;
    the high 2 bits of scale i are (byte 8 + i % 4) >> 2*(i // 4) & 3. Stored with an offset of 32.
        byte 0..7 : HHHHLLLL  low nibbles of scales 8..15 (H) and 0..7 (L)
        byte 8..11: ddccbbaa  high bit pairs of scales j (a), j+4 (b), j+8 (c), j+12 (d), j = byte-8
    """
    lo = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=-1)
    hi = _planes(s[:, 8:], 1, 4, 2)
    return (lo | (hi << 4)).astype(np.int8) - np.int8(32)


def _dequant_q3_k(b: np.ndarray, out: np.ndarray) -> None:
    # block_q3_K, 110 bytes:  [0:32] hmask | [32:96] qs | [96:108] scales | [108:110] d f16.
    # 16 sub-blocks of 16 values with signed 6-bit scales (_q3_k_scales).
    # Low 2 bits of each quant: qs, two groups of 32 bytes, shifts 0/2/4/6.
    # Third bit: hmask, one group of 32 bytes, shifts 0..7 (bit s of hmask[l] -> element s*32 + l).
    # The high bit is inverted: q = low2 - 4 when the hmask bit is 0, low2 when it is 1 (-4..3).
    # y = (d * scale) * q.
    y = out.reshape(-1, 16, 16)
    y[...] = (_planes(b["qs"], 2, 32, 2) | (_planes(b["hmask"], 1, 32, 1) << 2)).reshape(y.shape)
    y -= 4.0  # exact: the hmask bit, worth +4, came in as the quant's bit 2
    y *= (_f32(b["d"]) * _q3_k_scales(b["scales"]))[:, :, None]


def k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: (n, 12) packed bytes -> (scales, mins), each (n, 8) uint8 of 6 bits.

    ggml's get_scale_min_k4. For sub-block j < 4: scale = byte j & 63, min = byte j+4 & 63.
    For j >= 4 the low 4 bits come from byte j+4 (scale: low nibble, min: high nibble) and the high
    2 bits from the top bits of byte j-4 (scale) and byte j (min):
        byte 0..3 : SSssssss   s = scale j (6 bits),    S = top 2 bits of scale j+4
        byte 4..7 : MMmmmmmm   m = min j-4 (6 bits),    M = top 2 bits of min j
        byte 8..11: mmmmssss   low nibbles of min j-4 (m) and scale j-4 (s), j = byte index
    """
    a, m, lo = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (lo & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([m & 0x3F, (lo >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc, mn


def _apply_k_scales(b: np.ndarray, y: np.ndarray) -> None:
    """y (n, 8, 32) holds the quants; make it (d * scale) * q - (dmin * min) per sub-block."""
    sc, mn = k_scale_min(b["scales"])
    y *= (_f32(b["d"]) * sc)[:, :, None]
    y -= (_f32(b["dmin"]) * mn)[:, :, None]


Q4_K_BLOCK = np.dtype([("d", F16), ("dmin", F16), ("scales", np.uint8, 12), ("qs", np.uint8, 128)])


def _dequant_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    # block_q4_K, 144 bytes:  [0:2] d f16 | [2:4] dmin f16 | [4:16] scales | [16:144] qs.
    # 8 sub-blocks of 32 values, 6-bit scale and min each, packed as in k_scale_min.
    # qs: 4 groups of 32 bytes; group g holds sub-block 2g in its low nibbles and 2g+1 in its high.
    # Quants 0..15:  y = (d * scale) * q - (dmin * min).
    y = out.reshape(-1, 8, 32)
    y[...] = _planes(b["qs"], 4, 32, 4).reshape(y.shape)
    _apply_k_scales(b, y)


Q5_K_BLOCK = np.dtype([("d", F16), ("dmin", F16), ("scales", np.uint8, 12), ("qh", np.uint8, 32),
                       ("qs", np.uint8, 128)])


def _dequant_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    # block_q5_K, 176 bytes:  [0:2] d | [2:4] dmin | [4:16] scales | [16:48] qh | [48:176] qs.
    # As Q4_K plus a 5th bit: bit s of qh[l] is bit 4 of element s*32 + l.
    # Quants 0..31:  y = (d * scale) * q - (dmin * min).
    y = out.reshape(-1, 8, 32)
    y[...] = (_planes(b["qs"], 4, 32, 4) | (_planes(b["qh"], 1, 32, 1) << 4)).reshape(y.shape)
    _apply_k_scales(b, y)


Q6_K_BLOCK = np.dtype([("ql", np.uint8, 128), ("qh", np.uint8, 64), ("scales", np.int8, 16),
                       ("d", F16)])


def _dequant_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    # block_q6_K, 210 bytes:  [0:128] ql | [128:192] qh | [192:208] scales int8 | [208:210] d f16.
    # 16 sub-blocks of 16 values, each with a signed 8-bit scale.
    # Low 4 bits: ql, two groups of 64 bytes, shifts 0/4: element h*128 + s*64 + l <- ql[h*64 + l].
    # High 2 bits: qh, two groups of 32 bytes, shifts 0/2/4/6: element h*128 + s*32 + l.
    # Quants are stored with an offset of 32 (-32..31):  y = (d * scale) * q.
    y = out.reshape(-1, 16, 16)
    y[...] = (_planes(b["ql"], 2, 64, 4) | (_planes(b["qh"], 2, 32, 2) << 4)).reshape(y.shape)
    y -= 32.0  # exact: small integers
    y *= (_f32(b["d"]) * b["scales"])[:, :, None]


# type -> (block dtype, dequantizer), merged into quants._FORMATS.
FORMATS = {
    GGMLType.Q2_K: (Q2_K_BLOCK, _dequant_q2_k),
    GGMLType.Q3_K: (Q3_K_BLOCK, _dequant_q3_k),
    GGMLType.Q4_K: (Q4_K_BLOCK, _dequant_q4_k),
    GGMLType.Q5_K: (Q5_K_BLOCK, _dequant_q5_k),
    GGMLType.Q6_K: (Q6_K_BLOCK, _dequant_q6_k),
}
