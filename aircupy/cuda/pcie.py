"""The pinned host-to-device copy rate: what bounds a streamed forward pass (bytes streamed / rate).

    gbps = measure_pcie_gbps()          # None where CUDA is not usable; else best of 3 256 MiB copies

`aircupy inspect --vram-budget` states its decode bound at this rate when a GPU is present (and says
"assumed" with placement.ASSUMED_PCIE_GBPS otherwise); the benchmarks hold streaming against the
median of more copies of the same kind. One pinned buffer is copied whole into one device buffer on a
non-blocking stream, each copy timed with CUDA events around it; the first copy, which maps the
pinned pages into the device's address space, is not counted. cupy is imported inside the functions:
the module loads on a machine without a GPU.
"""
from __future__ import annotations

PROBE_BYTES = 256 << 20    # large enough that the per-copy latency (~10 us) is noise
PROBE_REPS = 3


def pinned_h2d_seconds(nbytes: int = PROBE_BYTES, reps: int = PROBE_REPS) -> list[float]:
    """Seconds of each of `reps` timed copies of `nbytes` from pinned host memory to the device."""
    import cupy as cp
    import cupyx
    import numpy as np

    host = cupyx.empty_pinned((nbytes,), dtype=np.uint8)
    host[:] = 1
    dev = cp.empty(nbytes, dtype=cp.uint8)
    stream = cp.cuda.Stream(non_blocking=True)
    times = []
    try:
        for i in range(reps + 1):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            dev.data.copy_from_host_async(host.ctypes.data, nbytes, stream)
            b.record(stream)
            b.synchronize()
            if i:                                   # the first copy warms up the mapping
                times.append(cp.cuda.get_elapsed_time(a, b) / 1e3)
    finally:
        del dev, host
    return times


def measure_pcie_gbps(nbytes: int = PROBE_BYTES, reps: int = PROBE_REPS) -> float | None:
    """GB/s of the fastest of `reps` pinned host-to-device copies of `nbytes`; None when CUDA is not
    usable here (cuda/backend.py says why) or the measurement fails (e.g. no pinned memory left)."""
    from aircupy.cuda.backend import cuda_unavailable_reason

    if cuda_unavailable_reason() is not None:
        return None
    try:
        best = min(pinned_h2d_seconds(nbytes, reps))
    except Exception:  # noqa: BLE001 - CUDARuntimeError, OutOfMemoryError: the assumed rate stands
        return None
    return nbytes / best / 1e9
