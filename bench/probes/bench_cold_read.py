"""The read side of a cold weight load, on the CPU: the old per-tensor mmap path vs the staged one.

    python -m bench.probes.bench_cold_read --model m.gguf [--setup-s 0.5] [--reps 2] [--json out.json]

Issue 5: TTFT from a cold page cache within 10% of file size / disk rate. No GPU here: the upload
is faked by a numpy copy of the same bytes to the same destination (the device blocks are host
arrays, repacks are skipped: on the GPU they run at HBM speed, far off the critical path). Per run,
the file is evicted (fsync + POSIX_FADV_DONTNEED, bench_cold.evict), then:
  disk    one thread of 16 MiB preads over the whole file (bench_cold.disk_rate): the bound;
  old     cuda_weights.fill's host side: per piece source in layout order, a copy out of the mmap
          view (page faults on the cold file; what the pageable cudaMemcpy did), after `setup_s`;
  staged  staged_fill.run_load: 32 MiB preads by a Stager ring (2 reader threads, 4 buffers) in
          file order, the copies on the caller's thread; its ReadAhead (one thread of 16 MiB
          preads, the disk's only reader until it is done) starts before `setup_s`;
  staged-ra2  the same with two warmer threads;
  staged-no-ra  the same without ReadAhead (the disk waits for the setup);
  staged-dma  staged with the upload costing no host CPU (DmaSink), as from pinned memory
          on the GPU host. The numpy-copy fake charges the staged path a second CPU copy per byte
          that the GPU path does not make, while the old path's fake copy is real there (a pageable
          cudaMemcpy copies through the driver's staging buffer on the CPU).
`setup_s` stands for what the GPU process does before it can consume bytes (CUDA context, pool,
NVRTC; ~0.3-1 s measured on the H200 host): the main thread sleeps that long first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from tests.helpers.host_sink import HostSink
from bench.bench_cold import disk_rate, evict


class CopySink(HostSink):
    """The fake upload: HostSink (the bytes the GPU sink would DMA, copied into host blocks) minus
    the repack, which the GPU does at HBM speed (not the bound)."""

    def __init__(self, blocks, staging_bytes):
        super().__init__(blocks, staging_bytes)
        # Touched before use, like the blocks (a device buffer has no first-touch page faults).
        self.staging = np.ones(staging_bytes, np.uint8)

    def repack(self, block, piece, s, row0):
        pass


class DmaSink(CopySink):
    """The upload as the GPU does it from pinned buffers: a DMA, no host CPU (nothing to do here)."""

    def copy(self, part, block, off):
        pass

    def stage(self, part, off):
        pass


def _layouts(g):
    from aircupy.config import ModelConfig
    from aircupy.gguf.arch import tensor_map
    from aircupy.cuda.layout import global_layout, layer_layout
    c = ModelConfig.from_gguf(g)
    tm = tensor_map(c.arch, c.n_layers, g.tensors)
    return [global_layout(tm.globals, g.tensors)] + \
        [layer_layout(tm.layers[i], g.tensors, True) for i in range(c.n_layers)]


def _blocks(path: Path) -> list[np.ndarray]:
    """The fake device blocks, touched before the clock starts (device memory needs no first-touch
    page faults; host arrays would add them to the timed copies)."""
    from aircupy.gguf.reader import GGUFFile
    with GGUFFile(path) as g:
        return [np.ones(lay.nbytes, np.uint8) for lay in _layouts(g)]


def old_path(path: Path, setup_s: float) -> float:
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.weights import _host_vector
    blocks = _blocks(path)
    evict(path)
    t0 = time.perf_counter()
    with GGUFFile(path) as g:
        layouts = _layouts(g)
        time.sleep(setup_s)
        for lay, block in zip(layouts, blocks):
            for p in lay.pieces.values():
                if not p.is_matrix:
                    v = _host_vector(p, g.tensors)
                    block[p.offset:p.offset + v.nbytes] = v.view(np.uint8)
                    continue
                o = p.offset
                for name, _ in p.sources:
                    src = g.tensors[name].data           # the mmap view: faults on a cold file
                    block[o:o + src.nbytes] = src
                    o += src.nbytes
    return time.perf_counter() - t0


def staged_path(path: Path, setup_s: float, read_ahead: int, sink_cls=CopySink) -> float:
    from aircupy.gguf.reader import GGUFFile
    from aircupy.stream.stager import Stager
    from aircupy.cuda.load import plan_load, run_load, start_read_ahead
    blocks = _blocks(path)
    evict(path)
    t0 = time.perf_counter()
    with GGUFFile(path) as g:
        layouts = _layouts(g)
        plan = plan_load(layouts, g.tensors, g.file_size)
        sink = sink_cls(blocks, max(s.nbytes for s in plan.sources))
        ra = start_read_ahead(path, plan.ranges, read_ahead)
        try:
            time.sleep(setup_s)
            with Stager(path, n_buffers=4, buffer_bytes=plan.chunk, read_ahead=ra) as st:
                run_load(plan, st, sink)
        finally:
            if ra is not None:
                ra.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--setup-s", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    size = a.model.stat().st_size
    paths = {"old": lambda s: old_path(a.model, s),
             "staged": lambda s: staged_path(a.model, s, 1),
             "staged-ra2": lambda s: staged_path(a.model, s, 2),
             "staged-no-ra": lambda s: staged_path(a.model, s, 0),
             "staged-dma": lambda s: staged_path(a.model, s, 1, DmaSink)}
    # Interleaved reps (disk, then every path and setup): a VM disk's rate drifts between runs.
    disk, times = [], {(n, s): [] for s in a.setup_s for n in paths}
    for _ in range(a.reps):
        disk.append(disk_rate(a.model, 1))
        for (n, s), ts in times.items():
            ts.append(paths[n](s))
    rate = float(np.median(disk))
    bound = size / (rate * 1e9)
    head = dict(model=a.model.name, size_GB=round(size / 1e9, 3), reps=a.reps,
                disk_GBps_median=round(rate, 3), disk_GBps_all=[round(d, 3) for d in disk],
                bound_s=round(bound, 3), host=platform.node(), cores=os.cpu_count(),
                cpu=_cpu_name())
    print(json.dumps(head), flush=True)
    rows = []
    for (n, s), ts in times.items():
        med = float(np.median(ts))
        row = dict(path=n, setup_s=s, load_s_median=round(med, 3), load_s_min=round(min(ts), 3),
                   ratio_median=round(med / bound, 3), GBps_median=round(size / med / 1e9, 3))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        a.json.write_text(json.dumps({**head, "runs": rows}, indent=1))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
