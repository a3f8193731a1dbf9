"""Streamed vs resident speed: prefill and decode tokens/s with bytes streamed, PCIe GB/s, stall.

    python bench/bench_streaming.py --model llama3-8b-Q4_0.gguf --resident all,16,0 [--n-prompt 512]
        [--n-gen 16] [--json out.json]

`all` = the resident CudaModel (decode graph-replayed); a number k = StreamedCudaModel with k layers
resident (n_resident=k, eager decode), the rest streamed through 3 slots with the RAM tier on.
Method: one warm-up of each, then pp = one forward over n_prompt random ids from an empty cache, tg =
n_gen greedy device-sampled steps. The PCIe bound of decode = bytes streamed per pass / the achieved
copy rate; `pcie_gbps` is bytes over the copy stream's busy time (repack included).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def bench_one(path: Path, resident: str, n_prompt: int, n_gen: int) -> dict:
    from aircupy.config import ModelConfig
    from aircupy.engine.params import SamplingParams
    from aircupy.gguf.reader import GGUFFile
    from aircupy.model.cuda_model import CudaModel
    from aircupy.model.cuda_streamed import StreamedCudaModel

    g = GGUFFile(path)
    c = ModelConfig.from_gguf(g)
    n_ctx = n_prompt + n_gen + 8
    t0 = time.perf_counter()
    if resident == "all":
        m = CudaModel(g, c, n_ctx)
    else:
        m = StreamedCudaModel(g, c, n_ctx, n_resident=int(resident))
    load_s = time.perf_counter() - t0
    cache = m.new_cache(n_ctx)
    ids = np.random.default_rng(0).integers(0, c.vocab_size, n_prompt).astype(np.int32)
    sampler = m.new_sampler(SamplingParams(temperature=0.0))

    def pp():
        cache.truncate(0)
        m.forward(ids, np.arange(n_prompt, dtype=np.int32), cache)

    def tg():
        cache.truncate(0)
        t = int(ids[0])
        for i in range(n_gen):
            t = m.forward_sample([t], [i], cache, sampler)

    out = {"model": path.name, "resident": resident, "load_s": round(load_s, 2)}
    for name, fn, n in (("pp", pp, n_prompt), ("tg", tg, n_gen)):
        fn()                                       # warm-up (and the RAM tier's first reads)
        before = m.stats() if hasattr(m, "stats") else None
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        out[f"{name}_tps"] = round(n / dt, 2)
        if before is not None and m.streamer is not None:
            after = m.stats()
            moved = after["bytes_streamed"] - before["bytes_streamed"]
            busy = after["upload_s"] - before["upload_s"]
            stall = after["stall_s"] - before["stall_s"]
            out[f"{name}_bytes_streamed_GB"] = round(moved / 1e9, 3)
            out[f"{name}_pcie_GBps"] = round(moved / busy / 1e9, 2) if busy > 0 else 0.0
            out[f"{name}_stall_s"] = round(stall, 4)
            out[f"{name}_wall_s"] = round(dt, 4)
            out[f"{name}_pcie_bound_s"] = round(busy, 4)
            out[f"{name}_overlap"] = round(1 - stall / busy, 3) if busy > 0 else 1.0
    if hasattr(m, "stats"):
        st = m.stats()
        out.update(streamed_layers=st["streamed_layers"], pool_GB=round(st["pool_bytes"] / 1e9, 2))
        if "last_pass" in st:
            out["bytes_per_pass_GB"] = round(st["last_pass"].get("bytes_streamed", 0) / 1e9, 3)
            out["disk_GBps"] = round(st["disk_gbps"], 2)
            out["ram_tier_hits"] = st["ram_tier_hits"]
        m.close()
    del m
    g.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--resident", default="all,0")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import cupy as cp
    gpu = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for r in a.resident.split(","):
        row = dict(bench_one(a.model, r, a.n_prompt, a.n_gen), gpu=gpu)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
