"""Shared argument checks and the launch helper of the typed CUDA launchers (cuda_ops and its parts).

RawKernel passes raw pointers: it ignores strides and turns a bare Python int into a 64-bit value, so
every launcher checks dtype, C-contiguity and shape first and passes scalars as np.int32 / np.float32
(np.int64 where the kernel takes a `long`). Nothing here allocates or synchronises: launchers are safe
inside CUDA-graph capture.
"""
from __future__ import annotations

import numpy as np

NULL = np.uint64(0)  # a null pointer argument


def check(a, dtype, shape=None, name: str = "array") -> None:
    """Assert a device array has `dtype`, is C-contiguous and (if given) has `shape` (None = any dim)."""
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (kernels ignore strides)")
    if shape is not None:
        if len(a.shape) != len(shape) or any(s is not None and int(d) != int(s) for d, s in zip(a.shape, shape)):
            raise ValueError(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")


def half_flag(a) -> np.int32:
    """1 for a bfloat16 buffer, 0 for float16. Half buffers are uint16 (bf16) or float16 arrays."""
    if a.dtype == np.float16:
        return np.int32(0)
    if a.dtype == np.uint16:  # cupy has no bfloat16 dtype: bf16 buffers are uint16 bit patterns
        return np.int32(1)
    raise TypeError(f"half buffer: dtype {a.dtype}, expected float16 or uint16 (bfloat16 bits)")


def launch(kernel, grid, block, args, stream=None, shared_mem: int = 0) -> None:
    """Launch on `stream` (a cupy Stream), or on cupy's current stream when None."""
    if stream is None:
        kernel(grid, block, args, shared_mem=shared_mem)
    else:
        with stream:
            kernel(grid, block, args, shared_mem=shared_mem)


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
