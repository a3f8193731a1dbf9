"""Benchmark continuous batching on the GPU: aggregate decode tokens/s and time to first token against
the number of concurrent sequences, through the Scheduler and CudaModel.forward_step_sample.

    python -m bench.bench_batch --model PATH.gguf --streams 1 8 32 64 --tokens 128 --prompt 32 --json OUT

Each stream is a distinct prompt (seeded random ids, --prompt tokens) generating --tokens tokens
(greedy on the device, end-of-text ignored). All streams are queued at once into one Scheduler
(max_num_seqs = the stream count, max_batched_tokens = --batch-tokens); the first steps prefill (chunked,
mixed with the decode rows of sequences already past their prompt), then every step decodes one token
per stream. Figures per stream count:
  decode_tok_s   tokens sampled in pure decode steps / those steps' wall time (scheduling, the host
                 loop and the id download included: what a serving loop gets, not a kernel figure)
  total_tok_s    every generated token / the whole run's wall time (prefill included)
  ttft_*         per sequence, from the moment all were queued to its first sampled token
  replayed       share of steps replayed from a captured decode graph
A warm-up run of the same shape precedes each measured run (kernels compiled, graphs captured).
This is the engine-free loop; the served figures (HTTP, detokenisation) come from bench_serve.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run(model, streams: int, tokens: int, prompt: int, batch_tokens: int, seed: int = 0) -> dict:
    from aircupy.engine.blocks import BlockManager
    from aircupy.engine.params import SamplingParams
    from aircupy.engine.scheduler import Scheduler
    spec = model.kv_spec()
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    sched = Scheduler(BlockManager(spec["num_blocks"], spec["block_size"]), max_num_seqs=streams,
                      max_batched_tokens=max(batch_tokens, streams), max_model_len=model.n_ctx)
    kv = model.new_kv_pool(spec["num_blocks"], spec["block_size"])
    greedy = SamplingParams(temperature=0.0)
    samplers = {}
    t0 = time.perf_counter()
    for _ in range(streams):
        s = sched.add(rng.integers(100, min(vocab, 30000), prompt).tolist())
        samplers[s.seq_id] = model.new_sampler(greedy)
    first: dict[int, float] = {}
    decode_s, decode_tokens, steps, graphs0 = 0.0, 0, 0, model.batch.graph_steps
    while sched.has_unfinished():
        ts = time.perf_counter()
        step = sched.schedule()
        chunks = step.logits_chunks
        ids, _ = model.forward_step_sample(step.arrays(), kv, [samplers[c.seq_id] for c in chunks])
        fin = []
        now = time.perf_counter()
        for c in chunks:
            first.setdefault(c.seq_id, now - t0)
            fin.append("length" if len(sched.get(c.seq_id).output_ids) + 1 >= tokens else None)
        sched.commit(step, [int(i) for i in ids], fin)
        steps += 1
        if all(c.num_tokens == 1 for c in step.chunks):
            decode_s += time.perf_counter() - ts
            decode_tokens += len(chunks)
    total = time.perf_counter() - t0
    ttft = np.array(sorted(first.values()))
    return dict(streams=streams, tokens=tokens, prompt=prompt, batch_tokens=batch_tokens,
                decode_tok_s=decode_tokens / decode_s if decode_s else None,
                total_tok_s=streams * tokens / total, seconds=total, steps=steps,
                ttft_p50=float(np.median(ttft)), ttft_max=float(ttft.max()),
                replayed=(model.batch.graph_steps - graphs0) / steps,
                preemptions=sched.num_preemptions)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--kv-tokens", type=int, default=None)
    ap.add_argument("--vram-budget", default=None, help="e.g. 24GiB: layers stream (one pass per step)")
    ap.add_argument("--json", default=None, help="append one JSON record per stream count to this file")
    a = ap.parse_args(argv)
    from aircupy.config import ModelConfig
    from aircupy.cuda.backend import load_model
    from aircupy.gguf.reader import GGUFFile
    g = GGUFFile(Path(a.model))
    c = ModelConfig.from_gguf(g)
    top = max(a.streams)
    kv_tokens = a.kv_tokens or top * (a.prompt + a.tokens + 32)
    from aircupy.engine.params import parse_size
    budget = parse_size(a.vram_budget) if a.vram_budget else None
    model = load_model(g, c, n_ctx=a.n_ctx, max_num_seqs=top, max_batched_tokens=max(a.batch_tokens, top),
                       kv_tokens=max(kv_tokens, a.n_ctx), vram_budget=budget)
    print(f"{Path(a.model).name}: {model.allocation_report()}")
    for n in a.streams:
        run(model, n, min(a.tokens, 16), a.prompt, a.batch_tokens, seed=99)   # warm-up: graphs, kernels
        r = run(model, n, a.tokens, a.prompt, a.batch_tokens)
        r.update(model=Path(a.model).name, device=_device(), vram_budget=a.vram_budget)
        st = model.stats()
        r["placement"] = {k: st.get(k) for k in ("resident_layers", "streamed_layers", "pool_bytes",
                                                  "device_bytes", "kv_shuttle")}
        if st.get("streamed_layers"):
            p = model.placement
            r["bytes_streamed_per_pass"] = p.bytes_streamed_per_pass
            r["streaming"] = {k: v for k, v in st.items() if isinstance(v, (int, float, str))}
        dec = f"{r['decode_tok_s']:9.1f}" if r["decode_tok_s"] else "        -"
        print(f"streams {n:4d}: decode {dec} tok/s  total {r['total_tok_s']:9.1f} tok/s  "
              f"ttft p50 {r['ttft_p50'] * 1e3:7.1f} ms max {r['ttft_max'] * 1e3:7.1f} ms  "
              f"steps {r['steps']} replayed {r['replayed']:.0%} preempted {r['preemptions']}", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(model.batch.report())
    if model.placement.streams:
        print(model.placement.report(), f"{model.placement.bytes_streamed_per_pass / 1e9:.2f} GB per pass")
    model.close()
    g.close()


def _device() -> str:
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


if __name__ == "__main__":
    main()
