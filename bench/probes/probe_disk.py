"""How fast can this host's disk deliver one cold file, and by which way of reading? (issue 5)

    python -m bench.probes.probe_disk --model m.gguf [--reps 3] [--methods pread:1:16,direct:4:16,...]

The cold-start target is TTFT <= 1.10 x file size / the measured disk rate, so the rate must be the
disk's, not one reader's: every method below reads the whole file once from a cold page cache
(bench_cold.evict), and the methods run interleaved, in a shuffled order per rep (the disk's rate
drifts by +-15% between whole-file reads on the GPU host: only medians over interleaved reps
compare). Methods (T threads, each taking every T-th piece of P MiB):
  pread:T:P     buffered preads into one reusable buffer per thread (bench_cold.disk_rate's way)
  seq:T:P       the same after posix_fadvise(SEQUENTIAL) (the kernel's readahead window doubled)
  direct:T:P    O_DIRECT preads (page cache bypassed: the device's own rate, no copy)
  warmer:T      the engine's page-cache warmer (stream/_warm_child.py in its child process)
  cat           `cat FILE > /dev/null`
One JSON line per read, then one per method (median, mean, min, max GB/s), then the block device's
queue settings (read_ahead_kb, scheduler, max_sectors_kb, nr_requests) and the file system.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

from bench.bench_cold import evict, read_file

DEFAULT = ("pread:1:16,pread:4:16,pread:1:64,pread:4:64,seq:1:16,"
           "direct:1:16,direct:4:16,direct:8:16,warmer:1,warmer:4,cat")


def run(path: Path, method: str) -> float:
    """GB/s of one cold whole-file read by `method`."""
    kind, *args = method.split(":")
    size = path.stat().st_size
    evict(path)
    t0 = time.perf_counter()
    if kind in ("pread", "seq", "direct"):
        threads, piece = int(args[0]), int(args[1]) << 20
        read_file(path, threads, piece, flags=os.O_DIRECT if kind == "direct" else 0,
                  advice=os.POSIX_FADV_SEQUENTIAL if kind == "seq" else None)
    elif kind == "warmer":
        from aircupy.stream.read_ahead import ReadAhead
        ra = ReadAhead(path, [(0, size)], ahead_bytes=size, threads=int(args[0]))
        ra.wait_done()
        ra.close()
        if ra.error is not None or ra.bytes_read != size:
            raise RuntimeError(f"warmer read {ra.bytes_read} of {size} bytes ({ra.error})")
    elif kind == "cat":
        with open(os.devnull, "wb") as null:
            subprocess.run(["cat", str(path)], stdout=null, check=True)
    else:
        raise ValueError(f"unknown method {method!r}")
    return size / (time.perf_counter() - t0) / 1e9


def queue_settings(path: Path) -> dict:
    """The block device's queue settings and the file system holding `path`."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    out = {"dev": os.path.realpath(dev)}
    for q in (f"{dev}/queue", f"{dev}/../queue"):          # a partition's queue is its disk's
        if os.path.isdir(q):
            for k in ("read_ahead_kb", "scheduler", "max_sectors_kb", "nr_requests", "rotational"):
                try:
                    out[k] = Path(q, k).read_text().strip()
                except OSError:
                    pass
            break
    best = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        dev_, mnt, fs, opts = line.split()[:4]
        if str(path.resolve()).startswith(mnt) and len(mnt) >= len(best):
            best, out["mount"] = mnt, f"{dev_} on {mnt} type {fs} ({opts})"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--import-gpu", action="store_true",
                    help="import cupy and aircupy's CUDA model first, as a GPU process has (the "
                         "context bench_cold's runs read in)")
    a = ap.parse_args()
    if a.import_gpu:
        import cupy  # noqa: F401
        import aircupy.cuda.streamed  # noqa: F401
    methods = a.methods.split(",")
    print(json.dumps({"queue": queue_settings(a.model), "size_GB": a.model.stat().st_size / 1e9}),
          flush=True)
    rows = []
    for rep in range(a.reps):
        order = methods[:]
        random.Random(rep).shuffle(order)
        for m in order:
            row = {"method": m, "rep": rep, "GBps": round(run(a.model, m), 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = []
    for m in methods:
        v = [r["GBps"] for r in rows if r["method"] == m]
        summary.append({"method": m, "median": round(statistics.median(v), 3),
                        "mean": round(statistics.fmean(v), 3), "min": min(v), "max": max(v)})
        print(json.dumps(summary[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"queue": queue_settings(a.model), "runs": rows,
                                      "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
