"""cublasGemmEx that can be recorded into a CUDA graph (called while a stream captures).

cupy's cuBLAS wrappers refuse to run during stream capture: cupy_backends' cublas.setStream raises
NotImplementedError("calling cuBLAS API during stream capture is currently unsupported"), a blanket
guard (cupy 14's, hit by the first prefill capture). cuBLAS itself supports capturing
cublasGemmEx; with host-pointer alpha/beta (the default pointer mode of cupy's handle) their values are
baked into the graph. So while a stream captures, ops.gemm calls the two entry points cupy's gemmEx
wrapper would have called -- cublasSetStream_v2, then cublasGemmEx -- with the same handle (cupy's, of
the current device), stream and arguments, straight from the libcublas this process already loaded,
through ctypes. Same handle, stream, shapes and workspace as the eager call, so cuBLAS has no reason to
pick another kernel; PrefillGraphs still compares every captured pass with its eager twin, bit for bit,
before keeping it (aircupy/cuda/prefill.py).

Only the library cupy loaded is used (found in /proc/self/maps): a second copy would not know cupy's
handle. Symbols and signatures: cublas_api.h of CUDA 12/13 (cublasGemmEx, cublasSetStream_v2).
"""
from __future__ import annotations

import ctypes
import functools
import os

_P, _I = ctypes.c_void_p, ctypes.c_int
# cublasGemmEx(handle, transa, transb, m, n, k, alpha*, A*, Atype, lda, B*, Btype, ldb, beta*, C*,
#              Ctype, ldc, computeType, algo): enums are C ints.
_GEMM_EX_ARGS = [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I]


def loaded_library(maps: str = "/proc/self/maps", prefix: str = "libcublas.so") -> str | None:
    """Path of the mapped shared object whose name starts with `prefix` (not libcublasLt), or None."""
    try:
        with open(maps) as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5]).startswith(prefix):
                    return parts[5]
    except OSError:
        return None
    return None


class CuBLAS:
    """The two cuBLAS entry points a captured GEMM needs, bound with their C signatures."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)  # already mapped: dlopen returns the loaded instance (same state)
        self.set_stream = lib.cublasSetStream_v2
        self.set_stream.argtypes, self.set_stream.restype = [_P, _P], _I
        self.gemm_ex = lib.cublasGemmEx
        self.gemm_ex.argtypes, self.gemm_ex.restype = _GEMM_EX_ARGS, _I

    def gemm(self, handle: int, stream_ptr: int, args) -> None:
        """cublasSetStream(handle, stream) then cublasGemmEx(handle, *args); raises on a status != 0.
        args: the 18 arguments after the handle, as cupy's cublas.gemmEx takes them."""
        st = self.set_stream(handle, stream_ptr)
        if st:
            raise RuntimeError(f"cublasSetStream_v2 returned status {st}")
        st = self.gemm_ex(handle, *args)
        if st:
            raise RuntimeError(f"cublasGemmEx returned status {st} during stream capture")


@functools.cache
def process_cublas() -> CuBLAS:
    """The CuBLAS of the libcublas cupy loaded (loaded once; cupy has called cuBLAS before any
    capture, since the first pass of every captured shape runs eagerly)."""
    path = loaded_library()
    if path is None:
        raise RuntimeError("libcublas is not loaded in this process (no eager cuBLAS call yet)")
    return CuBLAS(path)
