"""Kernel-level speed on the GPU: achieved HBM GB/s of the decode matvec per weight type, GEMM TFLOP/s on
Llama-3-8B prefill shapes, attention and sampler times. Prints a table; --json writes the numbers.

    python bench/bench_kernels.py [--json out.json] [--quick]
    python bench/bench_kernels.py --gemm [--gemm-m 512,2048] [--json out.json]

--gemm: the prefill matmul paths per shape (Llama-3-8B and SmolLM2 layers, Q4_0 / Q8_0 / Q4_K, M = 512
and 2048), all graph-replayed: dequant + cast into scratch + cuBLAS (linear(path="cublas")) against
gemm_q, the tensor-core kernel with the dequantization fused, on fp32 x ("fused") or after a cast of x
to half ("fused_xh"); prints the FAST_PATHS map for aircupy/cuda/ops/gemm_choice.py (shapes where a fused
path won by >= 3%).

Method: the launches are captured in a CUDA graph and its replays timed with device events (median of
several trials, after a warm-up); GEMMs (cuBLAS) and the copy baseline are timed as plain launches.
The matvec runs over one whole 8B layer (fused qkv 6144x4096, o 4096x4096, fused gate_up 28672x4096,
down 4096x14336: >= 120 MB in every type, over twice the 50 MB L2), so weights come from HBM each
time. Weight bytes are random (valid layouts, arbitrary values: speed does not depend on them). GB/s
counts the packed weight bytes read once per launch; x and out are negligible. The HBM ceiling is
measured in the same run: a device-to-device copy, (read + write) bytes / time.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from aircupy.gguf.ggml import GGMLType


def _time(cp, fn, reps: int, trials: int = 5, graph: bool = True) -> float:
    """Median seconds per call of fn() over `trials` runs of `reps` back-to-back calls.

    graph=True captures the `reps` calls into one CUDA graph and times its replays: a Python launch
    costs 10-30 us (argument checks, views, cupy's launch path), more than most of these kernels, so
    timing Python-issued launches would measure the host. The decode step runs as a graph too."""
    # The inputs were made on the legacy default stream, which a non-blocking stream does not wait
    # for: a pageable host-to-device copy (cp.asarray of `pos`) can still be in flight when the
    # timed launch reads it, and a stale position sends the attention kernel to a wild address
    # (seen once: cudaErrorInvalidAddressSpace). Finish all setup work first.
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()
        s.synchronize()
        g = None
        if graph:
            s.begin_capture()
            for _ in range(reps):
                fn()
            g = s.end_capture()
            g.launch(s)
        s.synchronize()
        out = []
        for _ in range(trials):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(s)
            if g is not None:
                g.launch(s)
            else:
                for _ in range(reps):
                    fn()
            b.record(s)
            b.synchronize()
            out.append(cp.cuda.get_elapsed_time(a, b) / 1e3 / reps)
    return float(np.median(out))


LAYER = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q2_K,
         GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.BF16, GGMLType.F32]


def bench_hbm(cp) -> float:
    a = cp.empty(1 << 30, dtype=cp.uint8)
    b = cp.empty_like(a)
    a.fill(1)
    t = _time(cp, lambda: b.__setitem__(Ellipsis, a), 10, graph=False)
    return 2 * a.nbytes / t / 1e9


def bench_matvec(cp, lib, ops, types, rows=(1,)) -> list[dict]:
    from aircupy.cuda.ops.packing import QWeight, repack_nbytes
    res = []
    for t in types:
        ws = []
        for _, n, k in LAYER:
            nbytes = repack_nbytes(t, (n, k))
            data = cp.random.randint(0, 256, size=nbytes, dtype=cp.uint8)
            if t in (GGMLType.F16, GGMLType.BF16, GGMLType.F32):  # finite floats
                data[...] = 0x3C if t != GGMLType.F32 else 0x3F
            ws.append(QWeight(data, t, (n, k)))
        total = sum(w.nbytes for w in ws)
        for m in rows:
            xs = [cp.random.standard_normal((m, k), dtype=cp.float32) for _, _, k in LAYER]
            outs = [cp.empty((m, n), dtype=cp.float32) for _, n, _ in LAYER]

            def layer():
                for w, x, o in zip(ws, xs, outs):
                    ops.matvec(lib, x, w, o)
            sec = _time(cp, layer, 20)
            res.append(dict(type=t.name, rows=m, layer_mb=total / 1e6, us=sec * 1e6, gbps=total / sec / 1e9))
        del ws
        cp.get_default_memory_pool().free_all_blocks()
    return res


def bench_gemm(cp, lib, ops, types, m=512) -> list[dict]:
    from aircupy.cuda.ops.packing import QWeight, repack_nbytes
    res = []
    for t in types:
        for name, n, k in LAYER:
            w = QWeight(cp.random.randint(0, 256, size=repack_nbytes(t, (n, k)), dtype=cp.uint8), t, (n, k))
            x = cp.random.standard_normal((m, k), dtype=cp.float32)
            out = cp.empty((m, n), dtype=cp.float32)
            wh = cp.empty((n, k), dtype=cp.float16)
            xh = cp.empty((m, k), dtype=cp.float16)
            scratch = cp.empty(ops.linear_scratch_nbytes(n, k, m), dtype=cp.uint8)
            ops.dequant(lib, w, wh)
            wh[...] = cp.random.standard_normal((n, k), dtype=cp.float32).astype(cp.float16) * 0.02
            ops.cast_half(lib, x, xh)
            t_deq = _time(cp, lambda: ops.dequant(lib, w, wh), 10)
            t_gemm = _time(cp, lambda: ops.gemm(lib, xh, wh, out), 10, graph=False)
            t_lin = _time(cp, lambda: ops.linear(lib, x, w, out, scratch=scratch), 10, graph=False)
            fl = 2.0 * m * n * k
            res.append(dict(type=t.name, shape=f"{name} {n}x{k}", m=m, dequant_us=t_deq * 1e6,
                            dequant_gbps=(w.nbytes + n * k * 2) / t_deq / 1e9, gemm_us=t_gemm * 1e6,
                            gemm_tflops=fl / t_gemm / 1e12, linear_us=t_lin * 1e6, linear_tflops=fl / t_lin / 1e12))
            del w, x, out, wh, xh, scratch
    return res


SMOL = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]  # SmolLM2-135M
# f16 header offsets inside a GGUF block: set to 2^-7 so random quant bytes make finite, realistic weights
_F16_AT = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
           GGMLType.Q8_0: (0,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2)}


def _random_qweight(cp, lib, ops, t, n, k):
    """A packed weight of random quant bytes and fixed finite scales (GGUF bytes -> ops.repack)."""
    from aircupy.gguf.ggml import BLOCK_GEOMETRY
    from aircupy.cuda.ops.packing import QWeight, repack_nbytes
    be, bb = BLOCK_GEOMETRY[t]
    raw = cp.random.randint(0, 256, size=(n * k // be, bb), dtype=cp.uint8)
    for o in _F16_AT[t]:
        raw[:, o], raw[:, o + 1] = 0x00, 0x20
    packed = cp.empty(repack_nbytes(t, (n, k)), dtype=cp.uint8)
    ops.repack(lib, raw.reshape(-1), packed, t, (n, k))
    return QWeight(packed, t, (n, k))


def _time_any(cp, fn, reps):
    """(seconds, how): graph replays, or plain launches where the capture fails."""
    try:
        return _time(cp, fn, reps), "graph"
    except Exception as e:  # noqa: BLE001 - a capture refusal must not end the run
        print(f"    (graph capture failed: {type(e).__name__}: {e}; timing plain launches)")
        return _time(cp, fn, reps, graph=False), "eager"


def bench_gemm_paths(cp, lib, ops, types, ms=(512, 2048)) -> list[dict]:
    """The prefill paths of linear() per (type, shape, M); also the relative L2 difference of each
    fused output from cuBLAS's (same rounded operands: expect ~1e-6)."""
    from aircupy.cuda.ops.gemm_choice import gemm_q_supports
    res = []
    for model, shapes in (("8B", LAYER), ("SmolLM2", SMOL)):
        for t in types:
            for name, n, k in shapes:
                if not gemm_q_supports(t.name, k):
                    print(f"  skip {t.name} {model} {name} {n}x{k}: gemm_q needs K % 256 == 0")
                    continue
                w = _random_qweight(cp, lib, ops, t, n, k)
                for m in ms:
                    x = cp.random.standard_normal((m, k), dtype=cp.float32)
                    scratch = cp.empty(ops.linear_scratch_nbytes(n, k, m), dtype=cp.uint8)
                    outs = {p: cp.empty((m, n), dtype=cp.float32) for p in ("cublas", "fused", "fused_xh")}
                    row = dict(model=model, type=t.name, shape=name, n=n, k=k, m=m)
                    for p, o in outs.items():
                        sec, how = _time_any(cp, lambda: ops.linear(lib, x, w, o, scratch=scratch, path=p), 10)
                        row[f"{p}_us"], row[f"{p}_timing"] = sec * 1e6, how
                        row[f"{p}_tflops"] = 2.0 * m * n * k / sec / 1e12
                    if m >= 128:  # the default there is BM 128: how BM 64 (more row tiles) compares
                        o64 = outs["fused"]
                        row["fused_bm64_us"] = _time_any(cp, lambda: ops.gemm_q(lib, x, w, o64, bm=64), 10)[0] * 1e6
                    ref = cp.linalg.norm(outs["cublas"])
                    row["rel_diff"] = max(float(cp.linalg.norm(outs[p] - outs["cublas"]) / ref)
                                          for p in ("fused", "fused_xh"))
                    res.append(row)
                    print(f"  {model:7s} {t.name:5s} {name:8s} {n:5d}x{k:5d} M={m:5d}  cublas {row['cublas_us']:8.1f} us"
                          f" ({row['cublas_tflops']:4.0f} TF/s)  fused {row['fused_us']:8.1f} ({row['fused_tflops']:4.0f})"
                          f"  fused_xh {row['fused_xh_us']:8.1f} ({row['fused_xh_tflops']:4.0f})"
                          + (f"  bm64 {row['fused_bm64_us']:8.1f}" if "fused_bm64_us" in row else "")
                          + f"  best x{row['cublas_us'] / min(row['fused_us'], row['fused_xh_us']):.2f}"
                          f"  diff {row['rel_diff']:.1e}", flush=True)
                    del x, scratch, outs
                del w
                cp.get_default_memory_pool().free_all_blocks()
    return res


def bench_attention(cp, lib, ops, quick=False) -> list[dict]:
    res = []
    h, hkv, hd = 32, 8, 128
    for ctx in ((512, 4096) if quick else (512, 4096, 32768)):
        ck = cp.random.standard_normal((1, hkv, ctx, hd), dtype=cp.float32).astype(cp.float16)
        cv = cp.random.standard_normal((1, hkv, ctx, hd), dtype=cp.float32).astype(cp.float16)
        q = cp.random.standard_normal((1, h, hd), dtype=cp.float32)
        pos = cp.asarray(np.array([ctx - 1], np.int32))
        out = cp.empty((1, h * hd), dtype=cp.float32)
        scratch = cp.empty(ops.attention_scratch_nbytes(1, h, hd), dtype=cp.uint8)
        sec = _time(cp, lambda: ops.attention(lib, q, ck, cv, pos, out, scale=0.088, scratch=scratch), 50)
        res.append(dict(kind="decode", ctx=ctx, us=sec * 1e6, kv_gbps=2 * ck.nbytes / sec / 1e9))
        T = 512
        if ctx >= T:
            qp = cp.random.standard_normal((T, h, hd), dtype=cp.float32)
            posp = cp.arange(ctx - T, ctx, dtype=cp.int32)
            outp = cp.empty((T, h * hd), dtype=cp.float32)
            sec = _time(cp, lambda: ops.attention(lib, qp, ck, cv, posp, outp, scale=0.088), 10)
            keys = (ctx - T) * T + T * (T + 1) / 2  # causal (query, key) pairs
            res.append(dict(kind=f"prefill {T} after {ctx - T}", ctx=ctx, us=sec * 1e6,
                            tflops=4 * keys * hd * h / sec / 1e12))
    return res


def _attn_kwargs(ops, min_chunk):
    """attention() keywords: min_chunk only where this tree's launcher has it (the bench also runs
    against older checkouts, for before/after figures)."""
    import inspect
    return {"min_chunk": min_chunk} if min_chunk and "min_chunk" in inspect.signature(ops.attention).parameters else {}


def bench_decode_attention(cp, lib, ops, ctxs=(64, 512, 576, 4096, 32768), chunks=(None, 32, 128)) -> list[dict]:
    """Decode attention (T = 1, 32 q heads, 8 kv heads, hd 128) over a cache of n_ctx = 32768 at each
    length (the graph's grid is sized for n_ctx, as in the model); min_chunk None = the default."""
    h, hkv, hd, n_ctx = 32, 8, 128, max(ctxs)
    ck = cp.random.standard_normal((1, hkv, n_ctx, hd), dtype=cp.float32).astype(cp.float16)
    cv = cp.random.standard_normal((1, hkv, n_ctx, hd), dtype=cp.float32).astype(cp.float16)
    q = cp.random.standard_normal((1, h, hd), dtype=cp.float32)
    out = cp.empty((1, h * hd), dtype=cp.float32)
    scratch = cp.empty(ops.attention_scratch_nbytes(1, h, hd), dtype=cp.uint8)
    res = []
    for ctx in ctxs:
        pos = cp.asarray(np.array([ctx - 1], np.int32))
        for mc in chunks:
            kw = _attn_kwargs(ops, mc)
            if mc and not kw:
                continue
            sec = _time(cp, lambda: ops.attention(lib, q, ck, cv, pos, out, scale=0.088, scratch=scratch, **kw), 50)
            res.append(dict(ctx=ctx, min_chunk=mc or "default", us=sec * 1e6))
    return res


def bench_decode_layer(cp, lib, ops, ctx=576) -> list[dict]:
    """One Llama-3-8B decode layer (Q4_0, T = 1, context `ctx`), launch by launch as ForwardPass.layer
    issues them, each timed alone (graph of 50) and the whole sequence as one graph: the gap between
    the sum of the matvecs and the layer is what the small kernels cost."""
    from aircupy.cuda.ops import layers as cuda_layers, matmul as cuda_matmul
    from aircupy.cuda.ops.packing import QWeight, repack_nbytes
    t = GGMLType.Q4_0
    w = {name: QWeight(cp.random.randint(0, 256, size=repack_nbytes(t, (n, k)), dtype=cp.uint8), t, (n, k))
         for name, n, k in LAYER}
    e, h, hkv, hd, f, n_ctx = 4096, 32, 8, 128, 14336, 4096
    r = lambda *s: cp.random.standard_normal(s, dtype=cp.float32)  # noqa: E731
    x, hb, qkv, attn, gu, act = r(1, e), r(1, e), r(1, 6144), r(1, e), r(1, 2 * f), r(1, f)
    nw = cp.ones(e, dtype=cp.float32)
    q, k, v = qkv[:, :4096].reshape(1, h, hd), qkv[:, 4096:5120].reshape(1, hkv, hd), qkv[:, 5120:].reshape(1, hkv, hd)
    ck = cp.random.standard_normal((hkv, n_ctx, hd), dtype=cp.float32).astype(cp.float16)
    cv = ck.copy()
    pos = cp.asarray(np.array([ctx - 1], np.int32))
    scratch = cp.empty(ops.attention_scratch_nbytes(1, h, hd), dtype=cp.uint8)
    rope_kw = dict(base=500000.0, mode="norm")
    steps = {
        "rms_norm": lambda: ops.rms_norm(lib, x, nw, hb, 1e-5),
        "matvec qkv": lambda: ops.matvec(lib, hb, w["qkv"], qkv),
        "rope_kv_store": lambda: cuda_layers.rope_kv_store(lib, q, k, v, ck, cv, pos, **rope_kw),
        "attention": lambda: ops.attention(lib, q, ck, cv, pos, attn, scale=0.088, scratch=scratch),
        "matvec o (+=)": lambda: ops.matvec(lib, attn, w["o"], x, accumulate=True),
        "matvec gate_up": lambda: ops.matvec(lib, hb, w["gate_up"], gu),
        "glu": lambda: ops.glu(lib, gu, act, "swiglu"),
        "matvec down (+=)": lambda: ops.matvec(lib, act, w["down"], x, accumulate=True),
    }
    xq = act.view(cp.uint8)
    if hasattr(cuda_matmul, "matvec_xq"):
        mm = cuda_matmul
        steps["matvec qkv, rms_norm fused"] = lambda: mm.matvec(lib, x, w["qkv"], qkv, norm_w=nw, eps=1e-5)
        steps["matvec gate_up, rms_norm fused"] = lambda: mm.matvec(lib, x, w["gate_up"], gu, norm_w=nw, eps=1e-5)
        steps["glu_quant"] = lambda: cuda_layers.glu_quant(lib, gu, xq, "swiglu")
        steps["matvec_xq down (+=)"] = lambda: mm.matvec_xq(lib, xq, 1, w["down"], x, accumulate=True)
        if "prefetch2" in __import__("inspect").signature(mm.matvec).parameters:
            steps["matvec qkv, no prefetch2"] = lambda: mm.matvec(lib, hb, w["qkv"], qkv, prefetch2=False)
            steps["matvec o (+=), no prefetch2"] = lambda: mm.matvec(lib, attn, w["o"], x, accumulate=True,
                                                                     prefetch2=False)
            steps["matvec gate_up, no prefetch2"] = lambda: mm.matvec(lib, hb, w["gate_up"], gu, prefetch2=False)
            steps["matvec_xq down (+=), no prefetch2"] = lambda: mm.matvec_xq(lib, xq, 1, w["down"], x,
                                                                              accumulate=True, prefetch2=False)
    old = ["rms_norm", "matvec qkv", "rope_kv_store", "attention", "matvec o (+=)", "rms_norm",
           "matvec gate_up", "glu", "matvec down (+=)"]
    seqs = {"layer, norms and glu separate": old}
    if hasattr(cuda_matmul, "matvec_xq"):
        seqs["layer, all fusions"] = ["matvec qkv, rms_norm fused", "rope_kv_store", "attention",
                                      "matvec o (+=)", "matvec gate_up, rms_norm fused", "glu_quant",
                                      "matvec_xq down (+=)"]
    res = [dict(step=name, us=_time(cp, fn, 50) * 1e6) for name, fn in steps.items()]
    for name, seq in seqs.items():
        fns = [steps[s] for s in seq]
        res.append(dict(step=f"{name} ({len(fns)} launchers)",
                        us=_time(cp, lambda: [fn() for fn in fns], 20) * 1e6))
    return res


def bench_sampler(cp, lib, ops, v=128256) -> list[dict]:
    logits = cp.random.standard_normal((1, v), dtype=cp.float32) * 3
    out = cp.empty(1, cp.int32)
    rng = cp.zeros((1, 2), cp.uint32)
    res = [dict(kind="argmax", us=_time(cp, lambda: ops.argmax(lib, logits, out), 50) * 1e6)]
    for label, p in [("temp 0.8 top_k 40 top_p .95 min_p .05", [0.8, 40, 0.95, 0.05]),
                     ("temp 1 top_p .9 (no top_k)", [1.0, 0, 0.9, 0.0]), ("temp 1, no cuts", [1.0, 0, 1.0, 0.0])]:
        par = cp.asarray(np.array([p], np.float32))
        res.append(dict(kind=label, us=_time(cp, lambda: ops.sample(lib, logits, par, rng, out), 50) * 1e6))
    return res


def print_decode(layer: list[dict], attn: list[dict]) -> None:
    print("decode layer, Llama-3-8B Q4_0, T=1, ctx 576 (each launch alone; then whole layers):")
    for r in layer:
        print(f"  {r['step']:44s} {r['us']:8.1f} us")
    print("decode attention (32 q / 8 kv heads, hd 128, cache n_ctx 32768):")
    for r in attn:
        print(f"  ctx {r['ctx']:6d}  min_chunk {str(r['min_chunk']):8s} {r['us']:8.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--quick", action="store_true", help="fewer types and shapes")
    ap.add_argument("--decode", action="store_true", help="only the decode layer breakdown and attention")
    ap.add_argument("--gemm", action="store_true", help="only the prefill paths: dequant+cuBLAS vs gemm_q")
    ap.add_argument("--gemm-m", default="128,512,2048", help="rows for --gemm (comma-separated)")
    ap.add_argument("--table-out", help="--gemm: write the measured map here (for AIRCUPY_GEMM_TABLE)")
    args = ap.parse_args()
    import cupy as cp
    from aircupy.cuda.kernels import KernelLibrary
    from aircupy.cuda import ops

    lib = KernelLibrary()
    lib.warmup()
    name = cp.cuda.runtime.getDeviceProperties(lib.device.id)["name"].decode()
    if args.decode:
        print(f"device: {name} ({lib.arch})")
        print_decode(bench_decode_layer(cp, lib, ops), bench_decode_attention(cp, lib, ops))
        return
    if args.gemm:
        from aircupy.cuda.ops.gemm_choice import format_table, measured_table, save_table
        print(f"device: {name} ({lib.arch}); prefill linear: dequant+cuBLAS vs gemm_q (graph replays)")
        ms = tuple(int(v) for v in args.gemm_m.split(","))
        rows = bench_gemm_paths(cp, lib, ops, [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_K], ms)
        print("gemm_choice table from this run (paste into aircupy/cuda/ops/gemm_choice.py):")
        print(format_table(measured_table(rows)))
        if args.table_out:
            save_table(measured_table(rows), args.table_out, device=name)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=name, arch=lib.arch, gemm_paths=rows), f, indent=1)
        return
    types = [GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q8_0] if args.quick else TYPES
    report = dict(device=name, arch=lib.arch, hbm_copy_gbps=bench_hbm(cp))
    report["matvec"] = bench_matvec(cp, lib, ops, types, rows=(1, 8) if not args.quick else (1,))
    report["gemm"] = bench_gemm(cp, lib, ops, [GGMLType.Q4_0] if args.quick else [GGMLType.Q4_0, GGMLType.Q4_K])
    report["attention"] = bench_attention(cp, lib, ops, args.quick)
    report["sampler"] = bench_sampler(cp, lib, ops)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"device: {name} ({lib.arch}); HBM copy {report['hbm_copy_gbps']:.0f} GB/s")
    print("matvec, one 8B layer (qkv, o, gate_up, down):")
    for r in report["matvec"]:
        print(f"  {r['type']:5s} M={r['rows']}  {r['layer_mb']:7.1f} MB  {r['us']:8.1f} us  {r['gbps']:7.0f} GB/s")
    print("prefill linear, M=512 (dequant -> fp16 scratch, cuBLAS GemmEx):")
    for r in report["gemm"]:
        print(f"  {r['type']:5s} {r['shape']:20s} dequant {r['dequant_us']:7.1f} us ({r['dequant_gbps']:5.0f} GB/s)"
              f"  gemm {r['gemm_us']:7.1f} us ({r['gemm_tflops']:5.0f} TF/s)  total {r['linear_tflops']:5.0f} TF/s")
    print("attention (32 q heads, 8 kv heads, hd 128):")
    for r in report["attention"]:
        extra = f"{r['kv_gbps']:6.0f} GB/s" if "kv_gbps" in r else f"{r['tflops']:6.1f} TF/s"
        print(f"  {r['kind']:24s} ctx {r['ctx']:6d}  {r['us']:8.1f} us  {extra}")
    print("sampler, V=128256:")
    for r in report["sampler"]:
        print(f"  {r['kind']:40s} {r['us']:7.1f} us")


if __name__ == "__main__":
    main()
