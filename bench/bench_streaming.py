"""Streamed vs resident speed: prefill and decode tokens/s with bytes streamed, PCIe GB/s, stall.

    python bench/bench_streaming.py --model llama3-8b-Q4_0.gguf --resident all,16,0 [--n-prompt 512]
        [--n-gen 16] [--json out.json]

`all` = the resident CudaModel (decode graph-replayed); a number k = CudaModel with k layers
resident (n_resident=k, eager decode), the rest streamed through 3 slots with the RAM tier on.
Method: one warm-up of each (then the RAM tier's copies are waited for: steady state), then pp =
one forward over n_prompt random ids from an empty cache, tg = n_gen greedy device-sampled steps.
The PCIe bound of decode = bytes streamed per pass / the achieved copy rate; `pcie_gbps` is bytes
over the copy stream's busy time (repack included).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def open_model(g, c, n_ctx: int, resident: str, vram_budget: int | None = None, **model_kw):
    """`resident` "all": CudaModel; a number k: CudaModel with k resident layers forced, the pool
    sized for them (vram_budget None: the free memory is the cap). model_kw go to the model's
    constructor (progress=, read_ahead=). Returns (model, load seconds)."""
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions

    t0 = time.perf_counter()
    if resident == "all":
        m = CudaModel(g, c, n_ctx, **model_kw)
    else:
        m = CudaModel(g, c, n_ctx, vram_budget=vram_budget,
                      options=CudaOptions(n_resident=int(resident)), **model_kw)
    return m, time.perf_counter() - t0


def measure(m, c, prompts: dict[str, int], n_gen: int, ttft_prompt: int | None = None,
            reps: int = 1) -> dict:
    """Tokens/s of each prefill in `prompts` ({"pp": 512}: key -> prompt length) and of `n_gen`
    greedy decode steps ("tg"), each warmed up once then timed `reps` times (median), with the
    streamer's bytes / copy-busy time / stall over the last timed run. ttft_prompt: also the time
    to first token of a prompt that long (prefill + device sampling of one id), as "ttft_s"."""
    from aircupy.engine.params import SamplingParams

    longest = max([*prompts.values(), ttft_prompt or 0])
    ids = np.random.default_rng(0).integers(0, c.vocab_size, longest).astype(np.int32)
    cache = m.new_cache(m.n_ctx)
    sampler = m.new_sampler(SamplingParams(temperature=0.0))

    def pp(n):
        cache.truncate(0)
        m.forward(ids[:n], np.arange(n, dtype=np.int32), cache)

    def tg():
        cache.truncate(0)
        t = int(ids[0])
        for i in range(n_gen):
            t = m.forward_sample([t], [i], cache, sampler)

    def ttft():
        cache.truncate(0)
        m.forward_sample(ids[:ttft_prompt], np.arange(ttft_prompt, dtype=np.int32), cache, sampler)

    phases = [(k, (lambda n=n: pp(n)), n) for k, n in prompts.items()] + [("tg", tg, n_gen)]
    if ttft_prompt:
        phases.append(("ttft", ttft, None))
    streamed = m.placement.streams
    out = {}
    for name, fn, n in phases:
        fn()                                       # warm-up (and the RAM tier's first reads)
        settle(m)
        times = []
        for _ in range(max(1, reps)):
            before = m.stats() if streamed else None
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        dt = float(np.median(times))
        if n is None:
            out[f"{name}_s"] = round(dt, 5)
        else:
            out[f"{name}_tps"] = round(n / dt, 2)
        if streamed:
            after = m.stats()
            moved = after["bytes_streamed"] - before["bytes_streamed"]
            busy = after["upload_s"] - before["upload_s"]
            stall = after["stall_s"] - before["stall_s"]
            out[f"{name}_bytes_streamed_GB"] = round(moved / 1e9, 3)
            out[f"{name}_pcie_GBps"] = round(moved / busy / 1e9, 2) if busy > 0 else 0.0
            out[f"{name}_stall_s"] = round(stall, 4)
            out[f"{name}_wall_s"] = round(times[-1], 4)
            out[f"{name}_pcie_bound_s"] = round(busy, 4)
            out[f"{name}_overlap"] = round(1 - stall / busy, 3) if busy > 0 else 1.0
    return out


def settle(m) -> None:
    """Steady state before timing: the streamed model's RAM-tier copies (made behind the first
    reads of the windows, on the Stager's pin thread; deferred on a cold start) are complete."""
    if m.placement.streams:
        m.weights.stager.tier_settled()


def placement_stats(m) -> dict:
    """Resident/streamed layers, pool size, and the last pass's streaming figures."""
    if not hasattr(m, "stats"):
        return {}
    st = m.stats()
    out = dict(streamed_layers=st["streamed_layers"], pool_GB=round(st["pool_bytes"] / 1e9, 2))
    if "last_pass" in st:
        out["bytes_per_pass_GB"] = round(st["last_pass"].get("bytes_streamed", 0) / 1e9, 3)
        out["disk_GBps"] = round(st["disk_gbps"], 2)
        out["ram_tier_hits"] = st["ram_tier_hits"]
    return out


def bench_one(path: Path, resident: str, n_prompt: int, n_gen: int) -> dict:
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile

    g = GGUFFile(path)
    c = ModelConfig.from_gguf(g)
    m, load_s = open_model(g, c, n_prompt + n_gen + 8, resident)
    out = {"model": path.name, "resident": resident, "load_s": round(load_s, 2)}
    out.update(measure(m, c, {"pp": n_prompt}, n_gen))
    out.update(placement_stats(m))
    if hasattr(m, "close"):
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
