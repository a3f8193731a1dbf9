"""Time to first token from a cold page cache, against the file size / the measured disk read rate.

    python bench/bench_cold.py --model llama3-8b-Q4_0.gguf --resident all,16,0 [--json out.json]

Issue 5's target: a cold start's TTFT is within 10% of file size / disk read rate. Method, per run:
  1. evict the file from the page cache: fsync (a freshly written synthetic file has dirty pages),
     then posix_fadvise(POSIX_FADV_DONTNEED) over the whole file (no root needed; it drops this
     file's clean cached pages only). The disk-rate step shows whether that worked: a page-cache
     read would run at tens of GB/s;
  2. disk rate: evict, then read the whole file with 16 MiB preads into one reusable buffer per
     thread, 1 and `--read-threads` threads in turn (what a loader at its best could do; on the GPU
     host they differ by less than the drift, probes/probe_disk.py); GB/s = size / wall time. One such
     read comes before the first run and after every run, so each run lies between two;
  3. cold TTFT, in a fresh process (cupy and aircupy imported, no CUDA call yet: the context is
     created inside the timed span, as on a real start): evict, then time, as the Engine starts:
     the page-cache warmer over the whole file, GGUFFile open, model construction (`resident`
     "all": CudaModel; a number k: StreamedCudaModel with k resident layers, RAM tier on; the model
     takes the warmer over) + a 16-token prompt's prefill and one device-sampled token, to the id on
     the host.
     The import time is reported beside it (imports_s), not in it.
`resident` "engine" times aircupy.Engine as a user starts it (the warmer is its own, one thread);
"warmer" the page-cache warmer alone, no model (its rate with nothing beside it). Diagnostics:
"tok" = "all" after building the tokenizer and chat template on the main thread (the Engine's order
before 2026-11-27's last change), "late" = "all" after an idle 0.6 s (a consumer that starts late).
A model that streams reads its windows on the first pass, a resident one at load: either way the
whole file crosses the disk once before the first token. bound_s = size / the mean of the disk
reads just before and after the run; ratio = ttft / bound_s (target <= 1.10). stages_s: when the
header was parsed and when the model reported each start-up stage (after the pool and CUDA context:
"uploading ... weights"; after the weights: "compiling GPU kernels"); `warmer`: when the page-cache
warmer started and read its last byte, and its GB/s. --read-ahead runs each model with each count of
cold-start warmer threads (0: none; staged_fill.start_read_ahead); --reps repeats the whole set,
interleaved, each rep starting one config later (this host's disk drifts by +-15% between
whole-file reads: single runs do not compare, medians over interleaved reps do). The summary gives
per config the median, best and worst ratio; batch_ratio = median TTFT / (size / the mean of every
disk read of the batch); vs_warmer_alone = median TTFT / the median of the warmer-alone runs (with
the fewest warmer threads; "warmer" runs once per count of --read-ahead, "engine" with its own).
(Runs 2-15 in RESULTS.md held each run against the faster of a 1- and a 4-thread read: the larger
of two noisy samples, on average 4.4% above their mean over those runs' 157 pairs, so the bound was
that much too short.)
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 16 << 20


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path, threads: int, piece: int = CHUNK, flags: int = 0,
              advice: int | None = None) -> None:
    """Read the whole file by `threads` threads, each taking every threads-th `piece` into one
    page-aligned buffer of its own (as O_DIRECT in `flags` needs); `advice`: a posix_fadvise first."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | flags)
    if advice is not None:
        os.posix_fadvise(fd, 0, 0, advice)

    def work(k: int) -> None:
        buf = mmap.mmap(-1, piece)
        mv = memoryview(buf)
        for off in range(k * piece, size, threads * piece):
            os.preadv(fd, [mv], off)        # the last piece reads short at the end of the file
        mv.release()
        buf.close()

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    os.close(fd)


def disk_rate(path: Path, threads: int) -> float:
    """GB/s of a cold whole-file read of 16 MiB preads by `threads` threads (read_file)."""
    evict(path)
    t0 = time.perf_counter()
    read_file(path, threads)
    return path.stat().st_size / (time.perf_counter() - t0) / 1e9


def cold_ttft(path: Path, resident: str, n_prompt: int = 16, read_ahead: int = 1) -> dict:
    """Seconds from a cold open to the first sampled id on the host, and what the model read.
    Call it in a fresh process (main() does): the CUDA context is created inside the timed span.
    As the Engine does: the page-cache warmer starts first, over the whole file (`read_ahead`
    threads; 0: none), then the header is parsed and the model takes the warmer over. `resident`
    "engine": aircupy.Engine itself (backend cuda, the default VRAM budget; the tokenizer and chat
    template are built too) and Engine.generate of one token."""
    from bench_streaming import open_model   # this script runs as `python bench/bench_cold.py`

    from aircupy.config import ModelConfig
    from aircupy.engine.params import SamplingParams
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.load import start_read_ahead

    n_ctx = 256
    evict(path)
    t0 = time.perf_counter()
    marks = {}                     # the model's progress stages, seconds since t0 (where time goes)

    def progress(stage: str) -> None:
        marks[stage] = round(time.perf_counter() - t0, 3)

    if resident == "warmer":       # the warmer alone, no model: its rate with nothing beside it
        ra = start_read_ahead(path, [(0, path.stat().st_size)], read_ahead)
        ra.wait_done()
        dt = time.perf_counter() - t0
        ra.close()
        return dict(resident=resident, read_ahead=read_ahead, ttft_s=round(dt, 3), load_s=round(dt, 3),
                    token=-1, stages_s={}, warmer=dict(start_s=round(ra.started_at - t0, 3),
                                                       GB=round(ra.bytes_read / 1e9, 3),
                                                       end_s=round(ra.last_read_at - t0, 3),
                                                       GBps=round(ra.bytes_read / dt / 1e9, 3)))
    if resident == "engine":
        import aircupy
        eng = aircupy.Engine(path, backend="cuda", n_ctx=n_ctx, progress=progress)
        t_load = time.perf_counter() - t0
        ids = np.random.default_rng(0).integers(0, eng.config.vocab_size, n_prompt).tolist()
        tok = eng.generate(ids, max_tokens=1, temperature=0.0).token_ids[0]
        ttft = time.perf_counter() - t0
        m, g = eng.model, None
    else:
        warmer = start_read_ahead(path, [(0, path.stat().st_size)], read_ahead)
        g = GGUFFile(path)
        c = ModelConfig.from_gguf(g)
        marks["gguf parsed"] = round(time.perf_counter() - t0, 3)
        if resident == "tok":      # the tokenizer and chat template first, as the Engine built them
            from aircupy.gguf.chat_template import ChatTemplate
            from aircupy.gguf.tokenizer import Tokenizer
            ChatTemplate.from_gguf(g, Tokenizer.from_gguf(g))
        elif resident == "late":   # the model starts 0.6 s late, idle meanwhile
            time.sleep(0.6)
        marks["pre"] = round(time.perf_counter() - t0, 3)
        m, _ = open_model(g, c, n_ctx, "all" if resident in ("tok", "late") else resident,
                          progress=progress, read_ahead=warmer or 0)
        t_load = time.perf_counter() - t0
        ids = np.random.default_rng(0).integers(0, c.vocab_size, n_prompt).astype(np.int32)
        cache = m.new_cache(n_ctx)
        tok = m.forward_sample(ids, np.arange(n_prompt, dtype=np.int32), cache,
                               m.new_sampler(SamplingParams(temperature=0.0)))
        ttft = time.perf_counter() - t0
    out = dict(resident=resident, read_ahead=read_ahead, ttft_s=round(ttft, 3),
               load_s=round(t_load, 3), token=int(tok), stages_s=marks)
    ra = m.warmer
    if ra is not None:             # the warmer's disk phase: when it began and ended, its rate
        out["warmer"] = dict(start_s=round(ra.started_at - t0, 3), GB=round(ra.bytes_read / 1e9, 3))
        if ra.last_read_at is not None:
            span = ra.last_read_at - ra.started_at
            out["warmer"].update(end_s=round(ra.last_read_at - t0, 3),
                                 GBps=round(ra.bytes_read / span / 1e9, 3) if span > 0 else None)
    if getattr(m, "streamer", None) is not None:
        st = m.stats()
        out.update(disk_GB=round(st["disk_bytes_read"] / 1e9, 3), disk_GBps=round(st["disk_gbps"], 2))
    if resident == "engine":
        out["model"] = type(m).__name__
        eng.close()
    else:
        if hasattr(m, "close"):
            m.close()
        g.close()
    del m
    return out


def child(argv: list[str]) -> None:
    """`--child MODEL RESIDENT THREADS`: one cold start in this fresh process; prints its row."""
    t_start = time.perf_counter()
    import cupy  # noqa: F401  (imported, no CUDA call yet: the context is made in the timed span)
    import aircupy.engine.engine  # noqa: F401  (a user's `import aircupy` and first Engine access)
    import aircupy.cuda.streamed  # noqa: F401
    path, resident, threads = Path(argv[0]), argv[1], int(argv[2])
    imports = time.perf_counter() - t_start
    row = cold_ttft(path, resident, read_ahead=threads)
    row["imports_s"] = round(imports, 3)       # before t0, not in ttft_s
    print(json.dumps(row), flush=True)


def run_child(path: Path, resident: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", str(path), resident, str(threads)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"cold start {resident}/{threads} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--resident", default="all,0")
    ap.add_argument("--read-threads", type=int, default=4)
    ap.add_argument("--read-ahead", default="1",
                    help="comma-separated counts of cold-start warmer threads to run (0: no warmer)")
    ap.add_argument("--reps", type=int, default=1,
                    help="runs per (model, warmer), interleaved; each against the disk reads just "
                         "before and after it (the disk's rate drifts between minutes)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()[:1]
    size = a.model.stat().st_size
    modes, counts = a.resident.split(","), [int(m) for m in a.read_ahead.split(",")]
    configs = [(r, m) for r in modes if r not in ("engine", "warmer") for m in counts] + \
        [("engine", 1)] * ("engine" in modes) + \
        [("warmer", m) for m in counts if m > 0 and "warmer" in modes]
    readers = sorted({1, a.read_threads})
    reads = []                     # every disk-rate read of the batch: (threads, GB/s)

    def disk() -> float:           # one whole-file read; the thread count alternates
        n = readers[len(reads) % len(readers)]
        reads.append((n, disk_rate(a.model, n)))
        return reads[-1][1]
    rows = []
    before = disk()
    for rep in range(a.reps):
        k = rep % len(configs)     # each rep starts one config later: no config always follows another
        for r, threads in configs[k:] + configs[:k]:
            row = run_child(a.model, r, threads)
            after = disk()
            bound = size / ((before + after) / 2 * 1e9)
            row.update(model=a.model.name, size_GB=round(size / 1e9, 3), gpu=gpu[0] if gpu else "?",
                       rep=rep, disk_before_GBps=round(before, 3), disk_after_GBps=round(after, 3),
                       bound_s=round(bound, 3), ratio=round(row["ttft_s"] / bound, 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
            before = after

    # The batch's disk rate: the mean of all its reads (both thread counts; they differ by less than
    # the drift, see probes/probe_disk.py). batch_ratio = median TTFT / (size / that rate).
    rate = float(np.mean([v for _, v in reads]))
    by = {c: [x for x in rows if (x["resident"], x["read_ahead"]) == c] for c in configs}
    alone = [x["ttft_s"] for x in by.get(("warmer", min(counts)), [])]
    summary = []
    for (r, m), rs in by.items():
        v, t = [x["ratio"] for x in rs], [x["ttft_s"] for x in rs]
        line = dict(resident=r, read_ahead=m, runs=len(rs), ttft_median_s=round(float(np.median(t)), 3),
                    ratio_median=round(float(np.median(v)), 3), ratio_min=min(v), ratio_max=max(v),
                    batch_ratio=round(float(np.median(t)) / (size / rate / 1e9), 3))
        if alone:                  # against the same reader with nothing beside it, same batch
            line["vs_warmer_alone"] = round(float(np.median(t) / np.median(alone)), 3)
        summary.append(line)
    batch = {"disk_GBps_mean": round(rate, 3), "disk_reads": len(reads),
             **{f"disk_GBps_mean_{n}thr": round(float(np.mean([v for m, v in reads if m == n])), 3)
                for n in readers}}
    for line in [batch] + summary:
        print(json.dumps(line), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"runs": rows, "disk_reads": reads, "batch": batch,
                                      "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
