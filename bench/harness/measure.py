"""GPU-side measurement for the harness: the pinned host->device bound, the session's environment, peak
VRAM of a subprocess (nvidia-smi polling) and one aircupy scenario (bench_streaming's functions).

Everything here imports cupy lazily: the module loads on a machine without a GPU (dry runs, tests).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time


def pinned_h2d_gbps(nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Host-to-device GB/s of one pinned buffer copied `reps` times (median of the copies, each timed
    with CUDA events on its own stream; aircupy.cuda.pcie, the copies `inspect` measures): the
    physical bound streaming is measured against."""
    import numpy as np

    from aircupy.cuda.pcie import pinned_h2d_seconds
    return nbytes / float(np.median(pinned_h2d_seconds(nbytes, reps))) / 1e9


def environment() -> dict:
    """Card, driver, CUDA, cupy, Python, aircupy version and commit, date (bench_resident.device_info)."""
    from bench.bench_resident import device_info

    import aircupy
    env = device_info()
    env.update(python=platform.python_version(), aircupy=aircupy.__version__, commit=git_commit())
    return env


def git_commit() -> str:
    """HEAD (+dirty), or $AIRCUPY_COMMIT where set: a GPU host's copy of the tree may carry a stale
    .git, so the device scripts pass the commit the session measured (git describe on this side)."""
    if os.environ.get("AIRCUPY_COMMIT"):
        return os.environ["AIRCUPY_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "") if r.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def vram_used_bytes() -> int:
    import cupy as cp
    free, total = cp.cuda.runtime.memGetInfo()
    return int(total - free)


def device_used_bytes(index: int = 0) -> int | None:
    """Device-wide memory in use: NVML (aircupy.cuda.memory, a ctypes call) where it reads, else
    nvidia-smi's MiB figure; None without either."""
    from aircupy.cuda.memory import nvml_used_bytes
    v = nvml_used_bytes(index)
    if v is not None:
        return v
    if shutil.which("nvidia-smi") is None:
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                        "-i", str(index)], capture_output=True, text=True, timeout=10)
    try:
        return int(r.stdout.strip().splitlines()[0]) << 20
    except (ValueError, IndexError):
        return None


class VramPoller:
    """Peak device memory in use while a block runs, sampled every `period` s (for a peer in another
    process: the lent machines run nothing else on the GPU, so the growth of the device's used memory
    is that process's whole footprint, its CUDA context included). Peak minus the reading at entry is
    reported; None where memory cannot be read. read: () -> bytes or None (default device_used_bytes)."""

    def __init__(self, period: float = 0.05, read=None):
        self.period, self.samples = period, []
        self.read = read or device_used_bytes
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            v = self.read()
            if v is not None:
                self.samples.append(v)
            self._stop.wait(self.period)

    def __enter__(self):
        self.base = self.read()
        if self.base is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_bytes(self) -> int | None:
        if self.base is None or not self.samples:
            return None
        return max(0, max(self.samples) - self.base)


def run_aircupy(path, placement, prompts: dict[str, int], n_gen: int, ttft_prompt: int,
                reps: int) -> dict:
    """One scenario on aircupy: the model the placement names, bench_streaming.measure over it, the
    real resident count (StreamPlacement may adjust the plan's), and peak VRAM (device memory in use
    after the runs minus before the load: the pool is sized once, the hot path never allocates)."""
    from bench.bench_streaming import measure, open_model, placement_stats

    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile

    g = GGUFFile(path)
    c = ModelConfig.from_gguf(g)
    n_ctx = max([*prompts.values(), ttft_prompt]) + n_gen + 8
    base = vram_used_bytes()
    resident = "all" if placement.resident else str(placement.n_resident)
    note = ""
    try:
        m, load_s = open_model(g, c, n_ctx, resident, placement.budget_bytes)
    except Exception as e:        # e.g. less free device memory than the budget
        if placement.budget_bytes is None:
            raise
        m, load_s = open_model(g, c, n_ctx, resident, None)
        note = f"pool did not fit the budget ({type(e).__name__}: {e}); ran with the free memory as cap"
    t0 = time.perf_counter()
    out = measure(m, c, prompts, n_gen, ttft_prompt=ttft_prompt, reps=reps)
    out.update(placement_stats(m), load_s=round(load_s, 2), bench_s=round(time.perf_counter() - t0, 1))
    out["peak_vram_bytes"] = vram_used_bytes() - base
    out["n_resident"] = len(m.placement.resident_layers)
    out["allocation"] = m.allocation_report()
    m.close()
    del m
    g.close()
    out["note"] = note
    return out
