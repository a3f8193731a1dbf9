"""The kernels' weight layout: GGUF blocks with their fp16 header split out ("repacked"). numpy only.

GGUF blocks of Q4_0 (18 B), Q8_0 (34), Q5_0 (22), Q3_K (110) and Q6_K (210) are only 2-byte aligned,
which would force the decode matvec into 16-bit loads. The repacked layout moves each block's fp16
header (d; d,m; d,dmin) into a separate region, leaving the rest of the block (its "body", ggml byte
order kept) 4-byte aligned, and 16-byte aligned for Q4_0/Q4_1 (16 B bodies), Q8_0 (32), Q2_K (80) and
Q6_K (208): one 16-byte load per piece in the kernels. For an (n_rows, n_cols) tensor, nb = n_cols /
block_elems blocks per row:

    [bodies: n_rows * nb * body_bytes][zero pad to 16][heads: n_rows * nb * head_bytes]

Block i of the tensor (row-major block order) has its body at i * body_bytes and its head at
heads_offset + i * head_bytes. Q4_K (144 B) and Q5_K (176 B) blocks are aligned as stored and the float
types need nothing: for those the layout is the raw GGUF bytes (needs_repack() is False).
cuda_src/common.cuh and blocks.cuh read this layout; repack_numpy is the host twin of the device
repack kernel (cuda_src/dequant.cu: repack_blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType, tensor_nbytes

# type -> (byte offset of the fp16 header inside the GGUF block, header bytes)
HEADERS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.Q4_0: (0, 2), GGMLType.Q4_1: (0, 4), GGMLType.Q5_0: (0, 2), GGMLType.Q5_1: (0, 4),
    GGMLType.Q8_0: (0, 2),
    GGMLType.Q2_K: (80, 4),   # scales[16] qs[64] | d dmin
    GGMLType.Q3_K: (108, 2),  # hmask[32] qs[64] scales[12] | d
    GGMLType.Q6_K: (208, 2),  # ql[128] qh[64] scales[16] | d
}
# Types the kernels read (raw or repacked); the float types are treated as 32-value blocks there.
KERNEL_TYPES = frozenset(HEADERS) | {GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.F32, GGMLType.F16,
                                     GGMLType.BF16}
ALIGN = 16


def needs_repack(t: int) -> bool:
    """True when the kernels' layout of type t differs from the GGUF bytes."""
    return GGMLType(t) in HEADERS


def _geometry(t: GGMLType, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(n_rows, n_blocks_per_row, block_bytes, n_blocks) of a 2-D (or 1-D) tensor."""
    be, bb = BLOCK_GEOMETRY[t]
    n_cols = int(shape[-1])
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if n_cols % be:
        raise ValueError(f"{t.name} row of {n_cols} values is not a whole number of {be}-value blocks")
    nb = n_cols // be
    return n_rows, nb, bb, n_rows * nb


def heads_offset(t: int, shape: tuple[int, ...]) -> int:
    """Byte offset of the heads region in the packed tensor (0 for types that are not repacked)."""
    t = GGMLType(t)
    if t not in HEADERS:
        return 0
    _, _, bb, n = _geometry(t, shape)
    body = n * (bb - HEADERS[t][1])
    return -(-body // ALIGN) * ALIGN


def repack_nbytes(t: int, shape: tuple[int, ...]) -> int:
    """Bytes of the packed tensor: the GGUF size, plus < 16 bytes of padding for repacked types."""
    t = GGMLType(t)
    if t not in HEADERS:
        return tensor_nbytes(t, tuple(shape))
    _, _, _, n = _geometry(t, shape)
    return heads_offset(t, shape) + n * HEADERS[t][1]


def repack_numpy(raw: np.ndarray, t: int, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF bytes (uint8, tensor_nbytes) -> packed bytes (uint8, repack_nbytes); the host twin."""
    t = GGMLType(t)
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != tensor_nbytes(t, tuple(shape)):
        raise ValueError(f"{raw.size} bytes for a {t.name} tensor of shape {tuple(shape)}")
    if t not in HEADERS:
        return raw.copy()
    _, _, bb, n = _geometry(t, shape)
    off, hb = HEADERS[t]
    blocks = raw.reshape(n, bb)
    out = np.zeros(repack_nbytes(t, shape), dtype=np.uint8)
    bodies = out[: n * (bb - hb)].reshape(n, bb - hb)
    bodies[:, :off] = blocks[:, :off]
    bodies[:, off:] = blocks[:, off + hb:]
    h0 = heads_offset(t, shape)
    out[h0: h0 + n * hb].reshape(n, hb)[...] = blocks[:, off:off + hb]
    return out


@dataclass(frozen=True)
class QWeight:
    """A weight matrix in the kernels' layout.

    data: device uint8 array of repack_nbytes(ggml_type, shape) bytes (cupy on the GPU; any array with
    .data.ptr works); ggml_type; shape = (N, K) in numpy order (N output rows, K inputs per row).
    """
    data: Any
    ggml_type: GGMLType
    shape: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "ggml_type", GGMLType(self.ggml_type))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.ggml_type not in KERNEL_TYPES:
            raise ValueError(f"no kernels for {self.ggml_type.name} weights")
        if len(self.shape) != 2:
            raise ValueError(f"weights are 2-D (N, K), got shape {self.shape}")
        if self.shape[1] % 32:
            raise ValueError(f"K = {self.shape[1]} is not a multiple of 32")

    @property
    def nbytes(self) -> int:
        return repack_nbytes(self.ggml_type, self.shape)
