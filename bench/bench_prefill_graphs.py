"""Prefill tokens/s of the resident CudaModel, eager launches vs replayed CUDA graphs (issue 4).

    python bench/bench_prefill_graphs.py --model SmolLM2.gguf [--n-prompt 512,1024,100] [--reps 5]

Method (bench_resident's): pp = one forward over n random ids from an empty (pooled) cache, logits of
the last token; warmed up once, then timed `reps` times with the host clock (median). Eager = the
model's prefill graphs detached; graphed = attached (a full chunk is captured during the warm-up, a
shorter prompt at its first timed run, so its median is over replays from reps >= 3). Also: the GPU
time of one replay of the full-chunk graph (back-to-back replays timed with CUDA events: the floor a
launch-free pass reaches), device memory the graphs take outside the pool, and whether the graphed
logits equal the eager ones bit for bit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from bench_resident import timed   # this script runs as `python bench/bench_prefill_graphs.py`


def run(path: Path, lengths: list[int], reps: int) -> dict:
    import cupy as cp
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel

    g = GGUFFile(path)
    c = ModelConfig.from_gguf(g)
    m = CudaModel(g, c, max(lengths) + 8)
    cache = m.new_cache(max(lengths) + 8)
    ids = np.random.default_rng(0).integers(0, c.vocab_size, max(lengths)).astype(np.int32)

    def pp(n):
        cache.truncate(0)
        return m.forward(ids[:n], np.arange(n, dtype=np.int32), cache)

    pg = m.prefill_graphs
    out = {"model": path.name, "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    m.prefill_graphs = None
    for n in lengths:
        out[f"pp{n}_eager_tps"] = round(n / timed(lambda: pp(n), reps), 1)
    ref = {n: pp(n) for n in lengths}
    m.prefill_graphs = pg
    cp.cuda.Device().synchronize()
    free0 = cp.cuda.runtime.memGetInfo()[0]
    for n in lengths:
        out[f"pp{n}_graph_tps"] = round(n / timed(lambda: pp(n), reps), 1)
        out[f"pp{n}_speedup"] = round(out[f"pp{n}_graph_tps"] / out[f"pp{n}_eager_tps"], 2)
        out[f"pp{n}_bit_identical"] = bool(np.array_equal(pp(n), ref[n]))
    cp.cuda.Device().synchronize()
    out["graphs_outside_pool_MiB"] = round((free0 - cp.cuda.runtime.memGetInfo()[0]) / 2**20, 2)
    full = pg.graphs.get(m.rows)
    if full is not None:
        # The graph's memcpy nodes upload whatever the pinned ids/positions hold. After pp(100) that
        # is positions 0..99 then the stale 612..1023 of pp1024's second chunk: replays timed on
        # them attend over ~1024 keys instead of <= 512 (the 2026-11-27 run's 3.36 ms per replay,
        # slower than a whole host-timed pp512 of 2.79 ms). A full pass first sets them to 0..511.
        pp(m.rows)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(m.stream)
        for _ in range(20):
            full.launch(m.stream)
        e1.record(m.stream)
        e1.synchronize()
        ms = cp.cuda.get_elapsed_time(e0, e1) / 20
        out[f"replay_gpu_ms_T{m.rows}"] = round(ms, 3)
        out[f"replay_gpu_bound_tps_T{m.rows}"] = round(m.rows / ms * 1e3, 1)
    out["report"] = m.allocation_report()
    del m
    g.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--n-prompt", default="512,1024,100")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(run(a.model, [int(x) for x in a.n_prompt.split(",")], a.reps), indent=1))


if __name__ == "__main__":
    main()
