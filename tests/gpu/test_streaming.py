"""GPU tier of layer streaming: the streamed CudaModel against the resident one (same kernels).

Logits must be bit-identical (the launch sequence per layer is the same; only where the weights sit
differs) for several budgets (0, about half and all but two layers resident), with many layers and
slots of one layer each, prefill in several chunks (one streamed pass per chunk) and eager decode.
Peak VRAM: the pool fits the budget, and the driver's free memory drops by at most the pool plus a
small allowance for what lives outside any pool (cuBLAS per-stream workspace; NVRTC modules were
loaded by the fixture).

KV shuttle: with the streamed layers' KV in pinned RAM (riding up with the layer into a KV slot and
its new rows going back), logits are bit-identical to KV in VRAM, over chunked prefill, decode, two
caches at once and a truncate (prefix reuse); for 0 and some resident layers, with cached slots (2
streamed layers), and when the budget leaves the shuttle as the only fit (chosen automatically).
"""
from __future__ import annotations

import gc

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
ROWS = 16           # prefill chunk: a 40-token prompt is 3 streamed passes
N_CTX = 64
OUTSIDE_POOL = 64 << 20   # cuBLAS may give the model's new streams their own workspace
CASES = [("llama3-8b", "Q4_0", 10), ("llama3-8b", "Q4_K", 10), ("qwen2-0.5b", "Q8_0", 8),
         ("gemma3-270m", "Q6_K", 6)]


@pytest.fixture(scope="module")
def lib():
    from aircupy.cuda.kernels import KernelLibrary
    lib = KernelLibrary()
    lib.warmup()
    return lib


def _run(model, prompt, steps):
    """All logits of the prompt, then `steps` greedy decode steps: (tokens, [logits])."""
    cache = model.new_cache(N_CTX)
    lg = model.forward(np.asarray(prompt, np.int32), np.arange(len(prompt), dtype=np.int32), cache,
                       all_logits=True)
    out, toks = [lg], []
    for _ in range(steps):
        toks.append(int(out[-1][-1].argmax()))
        out.append(model.forward(np.array([toks[-1]], np.int32), np.array([cache.length], np.int32),
                                 cache))
    return toks, out


@pytest.mark.parametrize("preset,qtype,n_layers", CASES)
def test_streamed_equals_resident_for_several_budgets(tmp_path, lib, preset, qtype, n_layers):
    import cupy as cp
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions, Footprint
    from aircupy.synth import synth_model
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    rep = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=n_layers, overrides=over, seed=7,
                      logit_std=8.0)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    prompt = list(np.random.default_rng(2).integers(4, c.vocab_size, 40))
    ref = CudaModel(g, c, N_CTX, lib=lib, options=CudaOptions(prefill_rows=ROWS))
    ref_toks, ref_logits = _run(ref, prompt, 12)
    del ref
    fp = Footprint.of(g, c, N_CTX, ROWS)
    # The budget that fits n_res resident layers; n_res is forced where that budget would hold every
    # layer (few streamed layers cost as much as they save: 2 or 3 streamed layers take 3 slots and
    # 2 staging buffers, gemma3's 3 of 6 included), so 2 streamed layers keep their own slots.
    for n_res, tier, force in ((0, 0, False), (n_layers // 2, None, False), (n_layers - 2, 0, True)):
        budget = _total(fp, n_res)
        force = force or _total(fp, n_layers) <= budget   # budget holds every layer: no streaming
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        free0 = cp.cuda.runtime.memGetInfo()[0]
        m = CudaModel(g, c, N_CTX, vram_budget=budget, lib=lib, options=CudaOptions(
            prefill_rows=ROWS, ram_tier_bytes=tier, n_resident=n_res if force else None, outside_bytes=0))
        assert len(m.placement.resident_layers) == n_res and m.pool.plan.total <= budget
        toks, logits = _run(m, prompt, 12)
        used = free0 - cp.cuda.runtime.memGetInfo()[0]
        st = m.stats()
        for i, (a, b) in enumerate(zip(ref_logits, logits)):
            assert np.array_equal(a, b), (f"budget {n_res} resident: step {i} max |diff| "
                                          f"{float(np.abs(a - b).max()):.3g}")
        assert toks == ref_toks
        S = n_layers - n_res
        passes = 3 + 12   # 3 prefill chunks, 12 decode steps
        assert st["passes"] == passes and st["streamed_layers"] == S
        assert not st["kv_shuttle"] and st["kv_bytes_up"] == st["kv_bytes_down"] == 0
        expected = S * passes if S > 3 else S   # <= 3 streamed: each keeps its slot
        assert st["uploads"] >= expected and st["bytes_streamed"] > 0 and st["pcie_gbps"] > 0
        if tier is None:   # RAM tier on: every window copied into it once, behind its first
            # read (on the pin thread); from the third pass on, at the latest, uploads hit it
            assert st["ram_tier_bytes"] == sum(m.weights.streamer.windows[i][1]
                                               for i in m.placement.streamed_layers)
            assert st["ram_tier_hits"] >= expected - 3 * S
        assert used <= budget + OUTSIDE_POOL, f"driver shows {used} B used for a {budget} B budget"
        print(f"STREAM {preset} {qtype} resident {n_res}/{n_layers}: pool {m.pool.plan.total} "
              f"<= budget {budget}, driver delta {used}, uploads {st['uploads']}, "
              f"{st['pcie_gbps']:.2f} GB/s, overlap {st['overlap']:.2f}")
        m.close()
        del m
    g.close()



def _total(fp, n_resident: int, shuttle: bool = False) -> int:
    """The pool of n_resident resident layers (spread as the planner spreads them)."""
    from aircupy.cuda.placement import resident_set
    return fp.pool_plan(resident_set(fp.n_layers, n_resident), shuttle, 3).total


def test_probe_streams_when_the_budget_is_too_small(tmp_path, lib):
    """load_model: a budget below the resident pool (plus what lies outside the pool: the reserve; the
    context exists already in this process) gives a streamed model that keeps the process within
    the budget; below the streaming minimum, a one-line PlanError that states it."""
    from aircupy.config import ModelConfig
    from aircupy.cuda.backend import load_model
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.placement import Footprint, PlanError
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path / "m.gguf", "llama3-8b", "Q4_0", n_layers=8, overrides=TINY, seed=1)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    fp = Footprint.of(g, c, N_CTX, 512)
    from aircupy.cuda.memory import OUTSIDE_RESERVE
    budget = _total(fp, 3) + OUTSIDE_RESERVE
    m = load_model(g, c, vram_budget=budget, n_ctx=N_CTX)
    p = m.placement
    assert p.streams and len(p.resident_layers) <= 3 and p.vram_bytes + p.outside_bytes <= budget
    assert m.device_bytes <= budget
    assert "streamed" in m.allocation_report()
    m.close()
    with pytest.raises(PlanError, match="minimum") as e:
        load_model(g, c, vram_budget=OUTSIDE_RESERVE + _total(fp, 0) // 4, n_ctx=N_CTX)
    assert "\n" not in str(e.value)
    g.close()


def _two_caches(model, prompt, steps=3):
    """Logits of: the prompt on cache a; its first 24 tokens on a second cache b (a held); a
    truncated to 20 and the rest of the prompt again; the rest on b; `steps` greedy steps on b."""
    n = len(prompt)
    ids = np.asarray(prompt, np.int32)
    a = model.new_cache(N_CTX)
    out = [model.forward(ids, np.arange(n, dtype=np.int32), a, all_logits=True)]
    b = model.new_cache(N_CTX)
    out.append(model.forward(ids[:24], np.arange(24, dtype=np.int32), b, all_logits=True))
    a.truncate(20)
    out.append(model.forward(ids[20:], np.arange(20, n, dtype=np.int32), a, all_logits=True))
    out.append(model.forward(ids[24:], np.arange(24, n, dtype=np.int32), b, all_logits=True))
    for _ in range(steps):
        t = int(out[-1][-1].argmax())
        out.append(model.forward(np.array([t], np.int32), np.array([b.length], np.int32), b))
    return out


@pytest.mark.parametrize("preset,qtype,n_layers", [("llama3-8b", "Q4_0", 8), ("gemma3-270m", "Q6_K", 6)])
def test_kv_shuttle_equals_kv_in_vram(tmp_path, lib, preset, qtype, n_layers):
    from aircupy.config import ModelConfig
    from aircupy.errors import InvalidParameterError
    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions, Footprint
    from aircupy.synth import synth_model
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    rep = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=n_layers, overrides=over, seed=5,
                      logit_std=8.0)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    prompt = list(np.random.default_rng(3).integers(4, c.vocab_size, 40))
    ref = CudaModel(g, c, N_CTX, lib=lib, options=CudaOptions(prefill_rows=ROWS))
    ref_toks, ref_logits = _run(ref, prompt, 12)
    ref_two = _two_caches(ref, prompt)
    del ref
    row = 2 * c.n_head_kv * c.head_dim * 2          # bytes of one token's K and V in one layer
    fp = Footprint.of(g, c, N_CTX, ROWS)
    budget = _total(fp, 0, shuttle=True)
    assert budget < _total(fp, 0)
    # (n_resident forced or None, budget): 0 and half resident, 2 streamed layers in cached slots,
    # and a budget only the shuttle fits (the automatic choice must take it)
    for n_res, vb in ((0, None), (n_layers // 2, None), (n_layers - 2, None), (None, budget)):
        kw = dict(n_resident=n_res, kv_shuttle=True) if n_res is not None else {}
        m = CudaModel(g, c, N_CTX, vram_budget=vb, lib=lib,
                      options=CudaOptions(prefill_rows=ROWS, ram_tier_bytes=0, outside_bytes=0, **kw))
        assert m.shuttle is not None and m.stats()["kv_shuttle"]
        if n_res is None:
            assert m.placement.resident_layers == () and m.pool.plan.total <= budget
        toks, logits = _run(m, prompt, 12)
        st = m.stats()
        for i, (a, b) in enumerate(zip(ref_logits, logits)):
            assert np.array_equal(a, b), (f"shuttle, {len(m.placement.resident_layers)} resident: step {i} "
                                          f"max |diff| {float(np.abs(a - b).max()):.3g}")
        assert toks == ref_toks
        S = len(m.placement.streamed_layers)
        assert st["kv_bytes_down"] == S * row * (40 + 12)      # every new row goes home once
        up_rows = (0 + 16 + 32 + sum(range(40, 52))) if S > 3 else 0   # cached slots keep the KV
        assert st["kv_bytes_up"] == S * row * up_rows
        two = _two_caches(m, prompt)
        for i, (a, b) in enumerate(zip(ref_two, two)):
            assert np.array_equal(a, b), f"two caches, part {i}: max |diff| {np.abs(a - b).max():.3g}"
        with pytest.raises(InvalidParameterError):
            m.new_cache(N_CTX + 1)
        print(f"SHUTTLE {preset} {qtype} resident {len(m.placement.resident_layers)}/{n_layers}: pool "
              f"{m.pool.plan.total}, KV up {st['kv_bytes_up']} B, down {st['kv_bytes_down']} B, "
              f"{st['pcie_gbps']:.2f} GB/s, overlap {st['overlap']:.2f}")
        m.close()
        del m
    g.close()
