"""KernelLibrary: compiles cuda_src once per process and device through cupy.RawModule, caches functions.

All .cu files of the `aircupy.cuda_src` package data are compiled as ONE translation unit (one NVRTC
call, one module load; the shared headers are included once through their #pragma once guards), with
-std=c++17 for the architecture of the current device (cupy passes -arch=sm_XY of the device; cupy's
on-disk kernel cache makes later processes load the cubin instead of recompiling). Kernels are
`extern "C"`, so they are found by plain name.

cupy is imported here lazily (house rule: aircupy/cuda/ is the only place that touches it, and only
when a GPU backend is asked for). Build a library once and hand it to the launchers in
aircupy/cuda/ops/__init__.py; call warmup() before capturing a CUDA graph, so no module load or dynamic
shared-memory attribute change happens during capture.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import threading
from concurrent.futures import Future
from pathlib import Path

# Every kernel file, in include order. A new .cu file must be listed here (the test suite checks that
# the package's .cu files and this list agree).
SOURCES = ("matvec.cu", "dequant.cu", "norm.cu", "rope.cu", "elementwise.cu", "attention_decode.cu",
           "attention_prefill.cu", "sample.cu", "gemm_q.cu")


def source_dir() -> Path:
    """The directory holding the .cu/.cuh files (package data of aircupy.cuda_src).

    A source checkout's own cuda_src/ (beside the imported aircupy package) wins over the package
    data: an editable install maps aircupy.cuda_src to the checkout it was installed from, so a second
    worktree imported through PYTHONPATH would otherwise compile the first one's kernels."""
    here = Path(__file__).resolve().parents[2] / "cuda_src"
    if (here / "common.cuh").is_file():
        return here
    return Path(str(importlib.resources.files("aircupy.cuda_src")))


def translation_unit() -> str:
    """The single source NVRTC compiles: one #include per kernel file (headers resolve through -I).

    It opens with a digest of every .cu/.cuh file: cupy's kernel cache is keyed on this text, so an
    edited kernel file must change it or a stale cubin would be loaded."""
    d = source_dir()
    h = hashlib.sha256()
    for f in sorted(d.glob("*.cu*")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"// aircupy cuda_src sha256 {h.hexdigest()}\n" + "".join(f'#include "{n}"\n' for n in SOURCES)


class KernelLibrary:
    """The compiled kernels of one device. `lib.fn(name)` -> cupy.RawKernel (cached)."""

    def __init__(self, device_id: int | None = None):
        import cupy  # lazy: see the module docstring

        self._cp = cupy
        self.device = cupy.cuda.Device(device_id) if device_id is not None else cupy.cuda.Device()
        cc = self.device.compute_capability  # e.g. "90"
        self.arch = f"sm_{cc}"
        props = cupy.cuda.runtime.getDeviceProperties(self.device.id)
        self.n_sm = int(props["multiProcessorCount"])
        self.max_smem_optin = int(props.get("sharedMemPerBlockOptin", 49152))
        self._module = None
        self._module_lock = threading.Lock()   # warmup_async's thread and the caller may race
        self._fns: dict[str, object] = {}

    @property
    def module(self):
        if self._module is None:
            with self._module_lock:
                if self._module is None:
                    d = source_dir()
                    with self.device:
                        m = self._cp.RawModule(code=translation_unit(),
                                               options=("-std=c++17", f"-I{d}"))
                        m.compile()
                    self._module = m
        return self._module

    def fn(self, name: str, dynamic_smem: int = 0):
        """The kernel `name`; raises its dynamic shared-memory limit to `dynamic_smem` when above 48 KiB."""
        k = self._fns.get(name)
        if k is None:
            k = self.module.get_function(name)
            self._fns[name] = k
        if dynamic_smem > 48 * 1024 and k.max_dynamic_shared_size_bytes < dynamic_smem:
            if dynamic_smem > self.max_smem_optin:
                raise ValueError(f"{name} needs {dynamic_smem} B of shared memory; the device allows "
                                 f"{self.max_smem_optin}")
            k.max_dynamic_shared_size_bytes = dynamic_smem
        return k

    def warmup(self) -> None:
        """Compile and load the module now (a few seconds the first time; cupy caches the cubin)."""
        _ = self.module

    def warmup_async(self) -> Future:
        """warmup() on a thread of its own: a cold start compiles (or loads the cached cubin)
        while the disk reads the weights. Launches meanwhile wait on the module lock; call
        warmup() (or .result()) before a graph capture. If the thread failed, the module is still
        None and the next use compiles on the caller's thread, raising the error there."""
        fut: Future = Future()

        def work() -> None:
            try:
                self.warmup()
                fut.set_result(None)
            except BaseException as e:   # re-raised by fut.result() on the caller's thread
                fut.set_exception(e)

        threading.Thread(target=work, name="aircupy-nvrtc", daemon=True).start()
        return fut
