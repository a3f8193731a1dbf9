"""Device memory the process holds, so that the VRAM budget bounds all of it, not only the pool.

A budget is a promise: `--vram-budget 24GiB` on a 24 GB card must fit beside nothing else. Besides the
pool, the process holds the CUDA context, the compiled kernels, cuBLAS's workspaces and the CUDA
graphs' bookkeeping. The model measures what exists before its pool (the context above all) and plans
the pool into budget - that - OUTSIDE_RESERVE (what is created after: kernels, cuBLAS workspaces,
graphs), then checks the whole at the end of its load and refuses to run over.

The reading: NVML's device-wide used memory (libnvidia-ml through ctypes; no extra package), taken
before the model's first CUDA call and again later: the difference is what this process added (the
lent machines run one process per GPU). Where NVML cannot be read, cudaMemGetInfo's used memory (after
the context exists: the context is then not seen) stands in, and the report says so.
"""
from __future__ import annotations

import ctypes

OUTSIDE_RESERVE = 256 << 20   # kernels, cuBLAS workspaces and graphs made after the pool is planned


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_used_bytes(index: int = 0) -> int | None:
    """Device-wide memory in use on GPU `index` by NVML (no CUDA context needed); None without NVML."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    handle, mem = ctypes.c_void_p(), _NvmlMemory()
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
            return None
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        return int(mem.used)
    finally:
        nvml.nvmlShutdown()


class DeviceMeter:
    """What this process added on the device since the meter was made (before the first CUDA call)."""

    def __init__(self, index: int = 0):
        self.index = index
        self.base = nvml_used_bytes(index)
        self.source = "nvml" if self.base is not None else "cudaMemGetInfo"

    def held(self) -> int:
        now = nvml_used_bytes(self.index) if self.base is not None else None
        if now is not None:
            return max(0, now - self.base)
        import cupy as cp                     # no NVML: the device's used memory, all of it
        free, total = cp.cuda.runtime.memGetInfo()
        return int(total - free)
