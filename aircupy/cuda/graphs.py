"""CUDA graph capture and replay of one fixed step (the T = 1 decode pass).

A decode step is ~10 launches per layer (300 for SmolLM2); from Python each costs ~6 us, more than
the kernel itself on a small model. Captured once into a CUDA graph, the whole step is one launch.

The captured step must be a pure sequence of device work on the current stream: no allocation, no
host synchronization, no host-side branching on device values. Its inputs and outputs travel through
fixed pinned host buffers (PinnedIO) whose copies are part of the graph, so a replay is:
write inputs on the host -> StepGraph.launch() -> stream.synchronize() -> read outputs.

The first call runs the step eagerly (that compiles kernels, creates cuBLAS handles and loads modules,
none of which may happen during a capture, and it does the real work of that step); it is captured
after that and replayed from then on. If capture fails (an old driver, a launcher that allocates), the
step keeps running eagerly and `fallback_reason` says why.
"""
from __future__ import annotations

import contextlib
from typing import Callable


class PinnedIO:
    """A page-locked host array and its device twin. The copies are raw cudaMemcpyAsync calls on the
    given stream (cupy's ndarray.set/get refuse to run while a stream captures), so they can be
    captured into a graph as memcpy nodes."""

    def __init__(self, device_array):
        import cupy
        import cupyx
        self._rt = cupy.cuda.runtime
        self.dev = device_array
        self.host = cupyx.empty_pinned(device_array.shape, dtype=device_array.dtype)
        assert device_array.flags.c_contiguous and self.host.nbytes == device_array.nbytes

    def upload(self, stream) -> None:
        self._rt.memcpyAsync(self.dev.data.ptr, self.host.ctypes.data, self.host.nbytes,
                             self._rt.memcpyHostToDevice, stream.ptr)

    def download(self, stream) -> None:
        self._rt.memcpyAsync(self.host.ctypes.data, self.dev.data.ptr, self.host.nbytes,
                             self._rt.memcpyDeviceToHost, stream.ptr)


def _refuse_allocation(nbytes: int):
    raise RuntimeError(f"a launcher allocated {nbytes} bytes from cupy's pool during graph capture "
                       "(the replay would reuse memory the pool may have handed out again)")


def capture_graph(step: Callable[[], None], stream, *, forbid_alloc: bool = False):
    """Capture step() (launches only) on `stream` into an instantiated cupy Graph; raises if the
    capture fails. forbid_alloc: any allocation from cupy's memory pool inside step() raises (cupy's
    capture mode is relaxed, so the driver would not refuse it) instead of being baked into the graph."""
    guard = contextlib.nullcontext()
    if forbid_alloc:
        import cupy
        guard = cupy.cuda.using_allocator(_refuse_allocation)  # thread-local: this thread only
    with stream:
        stream.begin_capture()
        try:
            with guard:
                step()
        finally:
            graph = stream.end_capture()
    return graph


class StepGraph:
    """Run `step` (launches only) on `stream`: eagerly the first time, then as a replayed graph."""

    def __init__(self, step: Callable[[], None], stream, enabled: bool = True):
        self.step = step
        self.stream = stream
        self.enabled = enabled
        self.graph = None
        self.fallback_reason: str | None = None if enabled else "disabled"
        self.calls = 0
        self.replays = 0

    def _capture(self) -> None:
        try:
            self.graph = capture_graph(self.step, self.stream)
        except Exception as e:  # keep working eagerly; the reason is reported in stats
            self.graph = None
            self.enabled = False
            self.fallback_reason = f"capture failed: {type(e).__name__}: {e}"

    def launch(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.launch(self.stream)
            self.replays += 1
            return
        with self.stream:
            self.step()
        if self.enabled and self.calls == 1:
            self.stream.synchronize()
            self._capture()

