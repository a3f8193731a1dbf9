"""Probe: the runner's host cost per step, with the model's pass replaced by an instant stand-in.

    python -m bench.probes.probe_runner_overhead [--streams 32] [--tokens 64] [--profile]

Engine on the numpy backend (for the tokenizer and the real runner), whose forward_step_sample is
swapped for one that returns a fixed id per logits row at once, every row "device-sampled" (a stand-in
sampler object): what remains is scheduling, step arrays, per-request token handling (detokenizing,
stop strings) and event delivery to N consumer threads.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import threading
import time

import numpy as np


class _Sampler:
    supported = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    from aircupy import Engine
    from aircupy.engine.params import SamplingParams
    eng = Engine(os.environ.get("AIRCUPY_SMOLLM2_GGUF"), backend="numpy", n_ctx=1024, max_num_seqs=a.streams)
    m = eng.model

    def fast(arrays, kv, samplers):
        return np.full(len(arrays["logits_rows"]), 1000, np.int32), None

    m.forward_step_sample = fast
    m.new_sampler = lambda params: _Sampler()
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    prof = cProfile.Profile() if a.profile else None

    def consume(i):
        for _ in eng.stream(f"Request {i}: a story about {i}", params):
            pass

    for rnd in range(2):
        if rnd == 1 and prof:
            threading.setprofile(lambda *x: None)
        t0 = time.perf_counter()
        ts = [threading.Thread(target=consume, args=(i,)) for i in range(a.streams)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        st = eng.stats()
        print(f"round {rnd}: {a.streams * a.tokens / dt:,.0f} tok/s, {st['steps']} steps so far, "
              f"{dt / a.tokens * 1e3:.2f} ms per token step")
    eng.close()


if __name__ == "__main__":
    main()
