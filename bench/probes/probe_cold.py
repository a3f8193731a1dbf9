"""Where a cold start's time goes beyond the disk (issue 5): fixed costs of a fresh process and the
streamed first pass's per-window timeline. A diagnostic; figures go to stdout as JSON lines.

    python -m bench.probes.probe_cold costs --model m.gguf       # fresh-process fixed costs
    python -m bench.probes.probe_cold timeline --model m.gguf [--resident all|K]   # a cold start, per read
    python -m bench.probes.probe_cold pin                         # page-locking 1 GiB: alloc vs register

The timeline starts the whole-file warmer first, as the Engine does, samples how far it has read
every 50 ms, and wraps Stager._read (every read: start, end, thread), Stager._alloc_and_read
(RAM-tier copies), ReadAhead.wait_for (waits for the warmer), staged_fill.pinned_alloc (every
page-locked allocation) and the start-up steps around the load ("span": the weights' load, kernel
warm-up, sampling and prefill-graph set-up, the first forward), in seconds since the open.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np



def costs(model: Path) -> None:
    t = time.perf_counter()
    import cupy as cp
    import cupyx
    out = {"import_cupy_s": time.perf_counter() - t}
    t = time.perf_counter()
    cp.cuda.Device(0).use()
    cp.empty(1)
    out["context_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cp.cuda.device.get_cublas_handle()
    out["cublas_handle_s"] = time.perf_counter() - t
    a = cp.ones((16, 4096), cp.float16)
    b = cp.ones((4096, 4096), cp.float16)
    for k in range(3):
        t = time.perf_counter()
        (a @ b.T).sum()
        cp.cuda.Device().synchronize()
        out[f"gemm16_{k}_s"] = time.perf_counter() - t
    n = 123 << 20
    for k in range(4):
        t = time.perf_counter()
        x = cupyx.empty_pinned((n,), np.uint8)
        out[f"pinned_alloc_{k}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        x[:] = 1
        out[f"pinned_touch_{k}_s"] = time.perf_counter() - t
    for k in range(2):
        t = time.perf_counter()
        y = np.empty(n, np.uint8)
        y[:] = 1
        out[f"numpy_alloc_touch_{k}_s"] = time.perf_counter() - t
    # page cache -> pinned: the model file's first windows, cached by a first read
    fd = os.open(model, os.O_RDONLY)
    bufs = [cupyx.empty_pinned((n,), np.uint8) for _ in range(2)]
    for b_ in bufs:
        os.preadv(fd, [memoryview(b_)], 0)
    t = time.perf_counter()
    os.preadv(fd, [memoryview(bufs[0])], 0)
    out["cached_pread_1thread_GBps"] = n / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    ths = [threading.Thread(target=os.preadv, args=(fd, [memoryview(bufs[i])], i * n)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    out["cached_pread_2threads_GBps"] = 2 * n / (time.perf_counter() - t) / 1e9
    os.close(fd)
    print(json.dumps({k: round(v, 4) for k, v in out.items()}), flush=True)


def timeline(model: Path, resident: str) -> None:
    import cupy  # noqa: F401
    from bench.bench_cold import evict
    from bench.bench_streaming import open_model

    import aircupy.stream.read_ahead as read_ahead
    import aircupy.stream.stager as staging
    import aircupy.cuda.load as staged_fill
    from aircupy.config import ModelConfig
    from aircupy.engine.params import SamplingParams
    from aircupy.gguf.reader import GGUFFile

    log = []
    t0 = [0.0]
    lock = threading.Lock()
    real_read, real_alloc = staging.Stager._read, staging.Stager._alloc_and_read
    real_wait = read_ahead.ReadAhead.wait_for
    real_pinned = staged_fill.pinned_alloc

    def rel():
        return round(time.perf_counter() - t0[0], 4)

    def read(self, buf, offset, nbytes):
        a = rel()
        real_read(self, buf, offset, nbytes)
        with lock:
            log.append(("read", offset, nbytes, a, rel(), threading.current_thread().name))

    def alloc_and_read(self, offset, nbytes):     # a RAM-tier copy: its wait, pinning and read
        a = rel()
        buf = real_alloc(self, offset, nbytes)
        with lock:
            log.append(("tier", offset, nbytes, a, rel(), threading.current_thread().name))
        return buf

    def wait_for(self, offset, nbytes):
        a = rel()
        real_wait(self, offset, nbytes)
        with lock:
            log.append(("wait", offset, nbytes, a, rel(), threading.current_thread().name))

    def pinned(nbytes):                            # every page-locked allocation of the load
        a = rel()
        buf = real_pinned(nbytes)
        with lock:
            log.append(("pin", 0, nbytes, a, rel(), threading.current_thread().name))
        return buf

    def span(owner, name):                        # one start-up step on the caller's thread
        real = getattr(owner, name)

        def wrapped(*a, **k):
            t = rel()
            try:
                return real(*a, **k)
            finally:
                with lock:
                    log.append(("span", 0, 0, t, rel(), f"{owner.__name__}.{name}"))
        setattr(owner, name, wrapped)

    from aircupy.cuda.kernels import KernelLibrary
    from aircupy.cuda import model as cuda_model, sampling as cuda_sampling, streamed as cuda_streamed
    for owner, name in ((KernelLibrary, "warmup"), (cuda_sampling.DeviceSampling, "__init__"),
                        (cuda_model.CudaModel, "_enable_prefill_graphs"),
                        (cuda_model.CudaModel, "forward_sample"), (cuda_model, "load_blocks"),
                        (cuda_streamed, "load_blocks")):
        span(owner, name)
    staging.Stager._read = read
    staging.Stager._alloc_and_read = alloc_and_read
    read_ahead.ReadAhead.wait_for = wait_for
    staged_fill.pinned_alloc = pinned
    evict(model)
    t0[0] = time.perf_counter()
    marks = {}
    # As the Engine starts: the whole-file warmer first; its progress sampled every 50 ms
    warmer = staged_fill.start_read_ahead(model, [(0, model.stat().st_size)], 1)
    progress_log = []

    def sample():
        while not warmer.done:
            progress_log.append((rel(), round(warmer.position / 1e9, 3)))
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    g = GGUFFile(model)
    c = ModelConfig.from_gguf(g)
    m, _ = open_model(g, c, 256, resident, progress=lambda s: marks.__setitem__(s, rel()),
                      read_ahead=warmer)
    marks["model built"] = rel()
    ids = np.random.default_rng(0).integers(0, c.vocab_size, 16).astype(np.int32)
    cache = m.new_cache(256)
    sampler = m.new_sampler(SamplingParams(temperature=0.0))
    marks["cache+sampler"] = rel()
    m.forward_sample(ids, np.arange(16, dtype=np.int32), cache, sampler)
    marks["first token"] = rel()
    # The same pass again (a fresh cache, same positions): what of the first one's time was
    # first-call cost (lazy kernel loading, Python caches) rather than the pass itself.
    del cache
    cache = m.new_cache(256)
    t = rel()
    m.forward_sample(ids, np.arange(16, dtype=np.int32), cache, sampler)
    marks["second forward_s"] = round(rel() - t, 4)
    ra = m.warmer
    marks["warmer_last_read"] = round(ra.last_read_at - t0[0], 4) if ra and ra.last_read_at else None
    print(json.dumps({"marks": marks}), flush=True)
    if getattr(m, "streamer", None) is not None:
        print(json.dumps({"stats": {k: v for k, v in m.stats().items() if not isinstance(v, dict)}},
                         default=str), flush=True)
    print(json.dumps({"warmer_GB_at_s": progress_log}), flush=True)
    for e in sorted(log, key=lambda e: e[3]):
        print(json.dumps(e), flush=True)


def pin() -> None:
    """Ways to get 1 GiB of page-locked host memory, and the DMA rate from registered memory."""
    import cupy as cp
    import cupyx
    out = {}
    cp.cuda.Device(0).use()
    cp.empty(1)
    n = 1 << 30
    t = time.perf_counter()
    cupyx.empty_pinned((n,), np.uint8)
    out["hostalloc_1GiB_s"] = time.perf_counter() - t
    t = time.perf_counter()
    np.empty(n, np.uint8)[:] = 0
    out["numpy_touch_1thread_s"] = time.perf_counter() - t

    def touch(arr, k, parts):
        step = len(arr) // parts
        arr[k * step:(k + 1) * step] = 0
    for nth in (4, 8):
        c = np.empty(n, np.uint8)
        t = time.perf_counter()
        ts = [threading.Thread(target=touch, args=(c, k, nth)) for k in range(nth)]
        for x in ts:
            x.start()
        for x in ts:
            x.join()
        out[f"numpy_touch_{nth}threads_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cp.cuda.runtime.hostRegister(c.ctypes.data, n, 0)
        out[f"hostRegister_after_touch_{nth}_s"] = time.perf_counter() - t
        d, s = cp.empty(n, cp.uint8), cp.cuda.Stream(non_blocking=True)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        d.data.copy_from_host_async(c.ctypes.data, n, s)
        e1.record(s)
        e1.synchronize()
        out[f"dma_from_registered_GBps_{nth}"] = n / cp.cuda.get_elapsed_time(e0, e1) * 1e3 / 1e9
        cp.cuda.runtime.hostUnregister(c.ctypes.data)
    c = np.empty(n, np.uint8)
    t = time.perf_counter()
    cp.cuda.runtime.hostRegister(c.ctypes.data, n, 0)
    out["hostRegister_untouched_s"] = time.perf_counter() - t
    print(json.dumps({k: round(v, 4) for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "pin":
        pin()
        sys.exit()
    what, model = sys.argv[1], Path(sys.argv[sys.argv.index("--model") + 1])
    if what == "costs":
        costs(model)
    else:
        timeline(model, sys.argv[sys.argv.index("--resident") + 1] if "--resident" in sys.argv else "0")
