"""Resident-model speed: prefill (pp) and decode (tg) tokens/s of CudaModel, with achieved HBM GB/s,
against llama.cpp's llama-bench on the same files in the same run.

    python bench/bench_resident.py --model SmolLM2.gguf --synth llama3-8b:Q4_0 --synth llama3-8b:Q4_K \
        [--llama-bench PATH/llama-bench] [--n-prompt 512] [--n-gen 128] [--reps 3] [--json out.json]

Method (mirrors llama-bench): pp = one forward over n_prompt random ids from an empty cache, logits
of the last token; tg = n_gen single-token steps from an empty cache, each sampling greedily on the
device and feeding the id back (only ids cross to the host). Each is warmed up once, then timed
`reps` times with the host clock around synchronous calls; the median is reported.
Decode HBM GB/s = bytes a step must read (every layer's weights, the head, the KV cache at the mean
length) x tokens/s. Prefill TFLOP/s = 2 x matrix parameters x n_prompt / time.
--profile adds one eager decode step timed per launcher with CUDA events, and the GPU time of one
replay of the captured decode graph (back-to-back replays, no host work between them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def device_info() -> dict:
    import cupy as cp
    props = cp.cuda.runtime.getDeviceProperties(0)
    info = {"gpu": props["name"].decode(), "cupy": cp.__version__,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = "unknown"
    return info


def timed(fn, reps: int) -> float:
    fn()  # warm-up (compiles, captures graphs)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_ours(path: Path, n_prompt: int, n_gen: int, reps: int, profile: bool) -> dict:
    from aircupy.config import ModelConfig
    from aircupy.engine.params import SamplingParams
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel

    g = GGUFFile(path)
    c = ModelConfig.from_gguf(g)
    t0 = time.perf_counter()
    m = CudaModel(g, c, n_prompt + n_gen + 8)
    load_s = time.perf_counter() - t0
    cache = m.new_cache(n_prompt + n_gen + 8)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size, n_prompt).astype(np.int32)
    pos = np.arange(n_prompt, dtype=np.int32)

    def pp():
        cache.truncate(0)
        m.forward(ids, pos, cache)

    sampler = m.new_sampler(SamplingParams(temperature=0.0))

    def tg():
        cache.truncate(0)
        t = int(ids[0])
        for i in range(n_gen):
            t = m.forward_sample([t], [i], cache, sampler)

    def tg_logits():
        cache.truncate(0)
        t = int(ids[0])
        for i in range(n_gen):
            t = int(m.forward([t], [i], cache)[0].argmax())

    pp_s, tg_s, tgl_s = timed(pp, reps), timed(tg, reps), timed(tg_logits, reps)
    head = m.glob.output if m.glob.output is not None else m.glob.token_embd
    layer_bytes = sum(lay.nbytes for lay in m.fp.layer_ls)
    kv_token = 2 * c.n_layers * c.n_head_kv * c.head_dim * 2
    step_bytes = layer_bytes + head.nbytes + kv_token * (n_gen + 1) / 2
    mat_params = sum(p.shape[0] * p.shape[1] for lay in m.fp.layer_ls for p in lay.matrices())
    out = {
        "model": path.name, "file_GB": path.stat().st_size / 1e9, "load_s": load_s,
        "pp_tps": n_prompt / pp_s, "tg_tps": n_gen / tg_s, "tg_logits_tps": n_gen / tgl_s,
        "tg_hbm_GBps": step_bytes * n_gen / tg_s / 1e9,
        "pp_tflops": 2 * (mat_params * n_prompt + head.shape[0] * head.shape[1]) / pp_s / 1e12,
        "alloc": m.allocation_report(),
    }
    if profile:
        out["profile_ms"] = profile_step(m, cache)
        out["graph_replay_ms"] = graph_replay_ms(m)
    del m
    g.close()
    return out


def profile_step(m, cache) -> dict:
    """One eager single-token step with CUDA events around every launcher call: ms per launcher."""
    import cupy as cp
    real, totals = m.fwd.ops, {}

    class Timed:
        def __getattr__(self, name):
            fn = getattr(real, name)

            def wrapper(*a, **kw):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(m.stream)
                fn(*a, **kw)
                e1.record(m.stream)
                totals.setdefault(name, []).append((e0, e1))
            return wrapper

    cache.truncate(0)
    m.forward(np.zeros(8, np.int32), np.arange(8, dtype=np.int32), cache)
    m.fwd.ops = Timed()
    try:
        with m.stream:
            m.prefill_chunk(np.zeros(1, np.int32), np.array([cache.length], np.int32), cache)
            m.fwd.head(0, 1)
        m.stream.synchronize()
    finally:
        m.fwd.ops = real
    return {k: round(sum(cp.cuda.get_elapsed_time(a, b) for a, b in v), 4)
            for k, v in sorted(totals.items())}


def graph_replay_ms(m, n: int = 200) -> float:
    """Mean time of one replay of the captured decode graph, host work excluded (the replays are
    queued back to back and timed with CUDA events): the GPU side of a decode step."""
    import cupy as cp
    g = m.sampling.g_logits
    if g.graph is None:
        return float("nan")
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record(m.stream)
    for _ in range(n):
        g.graph.launch(m.stream)
    e1.record(m.stream)
    e1.synchronize()
    return cp.cuda.get_elapsed_time(e0, e1) / n


def llama_bench_cmd(lb: str, path: Path, n_prompt, n_gen: int, reps: int, ngl: int = 99) -> list[str]:
    """llama-bench's command line; n_prompt an int or a list (one pp test per length)."""
    pp = ",".join(str(n) for n in n_prompt) if isinstance(n_prompt, (list, tuple)) else str(n_prompt)
    return [lb, "-m", str(path), "-p", pp, "-n", str(n_gen), "-ngl", str(ngl), "-r", str(reps),
            "-o", "json"]


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench -o json: a list of one object per test. Keep what the comparison needs: the test
    ("pp" with n_prompt tokens, or "tg" with n_gen), tokens/s mean and stddev, seconds per test run,
    -ngl, and the build and card it names."""
    rows = []
    for r in json.loads(text):
        pp = int(r.get("n_prompt") or 0)
        rows.append({"test": f"pp{pp}" if pp else f"tg{int(r.get('n_gen') or 0)}",
                     "n_prompt": pp, "n_gen": int(r.get("n_gen") or 0),
                     "avg_ts": float(r["avg_ts"]), "stddev_ts": float(r.get("stddev_ts") or 0.0),
                     "avg_s": float(r.get("avg_ns") or 0) / 1e9,
                     "n_gpu_layers": r.get("n_gpu_layers"), "build_commit": r.get("build_commit"),
                     "build_number": r.get("build_number"), "gpu_info": r.get("gpu_info"),
                     "model_size": r.get("model_size"),
                     "flags": {k: r[k] for k in LLAMA_FLAGS if k in r}})
    return rows


# llama-bench's settings that change its figures, recorded with every peer row
LLAMA_FLAGS = ("n_batch", "n_ubatch", "n_threads", "flash_attn", "use_mmap", "type_k", "type_v",
               "n_gpu_layers", "split_mode", "no_kv_offload", "backends")


def bench_llama(lb: str, path: Path, n_prompt: int, n_gen: int, reps: int) -> dict:
    cmd = llama_bench_cmd(lb, path, n_prompt, n_gen, reps)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    rows = parse_llama_bench(r.stdout)
    out = {"cmd": " ".join(cmd), "build": rows[0]["build_commit"] if rows else None}
    for row in rows:
        out["pp_tps" if row["n_prompt"] else "tg_tps"] = row["avg_ts"]
    return out


def synth_path(spec: str, directory: Path) -> Path:
    from aircupy.synth import synth_model
    preset, qtype = spec.split(":")
    p = directory / f"{preset}-{qtype.upper()}.gguf"
    if not p.exists():
        directory.mkdir(parents=True, exist_ok=True)
        print(synth_model(p, preset, qtype).summary(), flush=True)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], type=Path)
    ap.add_argument("--synth", action="append", default=[], metavar="PRESET:TYPE")
    ap.add_argument("--synth-dir", type=Path, default=Path("/tmp/aircupy-synth"))
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    models = list(a.model) + [synth_path(s, a.synth_dir) for s in a.synth]
    report = {"device": device_info(), "argv": sys.argv, "results": []}
    print(json.dumps(report["device"]), flush=True)
    for p in models:
        row = {"ours": bench_ours(p, a.n_prompt, a.n_gen, a.reps, a.profile)}
        if a.llama_bench:
            row["llama"] = bench_llama(a.llama_bench, p, a.n_prompt, a.n_gen, a.reps)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'model':34} {'pp t/s':>9} {'llama':>9} {'x':>5} {'tg t/s':>8} {'llama':>8} {'x':>5}"
          f" {'HBM GB/s':>9} {'TFLOP/s':>8}")
    for row in report["results"]:
        o, lm = row["ours"], row.get("llama", {})
        lp, lt = lm.get("pp_tps"), lm.get("tg_tps")
        f = (lambda v: f"{v:9.1f}" if v else f"{'-':>9}")
        print(f"{o['model'][:34]:34} {o['pp_tps']:9.1f} {f(lp)} "
              f"{(o['pp_tps'] / lp if lp else 0):5.2f} {o['tg_tps']:8.1f} {f(lt)[1:]} "
              f"{(o['tg_tps'] / lt if lt else 0):5.2f} {o['tg_hbm_GBps']:9.0f} {o['pp_tflops']:8.1f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
