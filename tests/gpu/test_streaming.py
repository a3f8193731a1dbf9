"""GPU tier of layer streaming: StreamedCudaModel against the resident CudaModel (same kernels).

Logits must be bit-identical (the launch sequence per layer is the same; only where the weights sit
differs) for several budgets (0, about half and all but two layers resident), with many layers and
slots of one layer each, prefill in several chunks (one streamed pass per chunk) and eager decode.
Peak VRAM: the pool fits the budget, and the driver's free memory drops by at most the pool plus a
small allowance for what lives outside any pool (cuBLAS per-stream workspace; NVRTC modules were
loaded by the fixture).
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
    from aircupy.device.kernels import KernelLibrary
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
    from aircupy.model.cuda_model import CudaModel
    from aircupy.model.cuda_streamed import StreamedCudaModel
    from aircupy.model.stream_placement import StreamPlacement
    from aircupy.synth import synth_model
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    rep = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=n_layers, overrides=over, seed=7,
                      logit_std=8.0)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    prompt = list(np.random.default_rng(2).integers(4, c.vocab_size, 40))
    ref = CudaModel(g, c, N_CTX, lib=lib, prefill_rows=ROWS)
    ref_toks, ref_logits = _run(ref, prompt, 12)
    del ref
    sp, _, _ = StreamPlacement.for_model(g, c, N_CTX, ROWS, 3)
    # The budget that fits n_res resident layers; the last case forces n_res (its budget would hold
    # every layer: 2 streamed layers cost 3 slots), so 2 streamed layers keep their own slots.
    for n_res, tier, force in ((0, 0, False), (n_layers // 2, None, False), (n_layers - 2, 0, True)):
        budget = sp.total(n_res)
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        free0 = cp.cuda.runtime.memGetInfo()[0]
        m = StreamedCudaModel(g, c, N_CTX, vram_budget=budget, lib=lib, prefill_rows=ROWS,
                              ram_tier_bytes=tier, n_resident=n_res if force else None)
        assert len(m.resident_layers) == n_res and m.pool.plan.total <= budget
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
        expected = S * passes if S > 3 else S   # <= 3 streamed: each keeps its slot
        assert st["uploads"] >= expected and st["bytes_streamed"] > 0 and st["pcie_gbps"] > 0
        if tier is None:   # RAM tier on: the file is read once
            assert st["ram_tier_hits"] >= expected - S
        assert used <= budget + OUTSIDE_POOL, f"driver shows {used} B used for a {budget} B budget"
        print(f"STREAM {preset} {qtype} resident {n_res}/{n_layers}: pool {m.pool.plan.total} "
              f"<= budget {budget}, driver delta {used}, uploads {st['uploads']}, "
              f"{st['pcie_gbps']:.2f} GB/s, overlap {st['overlap']:.2f}")
        m.close()
        del m
    g.close()


def test_probe_streams_when_the_budget_is_too_small(tmp_path, lib):
    """load_model: a budget below the resident pool gives a streamed model; below the streaming
    minimum, a one-line PlanError that states it."""
    from aircupy.config import ModelConfig
    from aircupy.device.probe import load_model
    from aircupy.gguf.reader import GGUFFile
    from aircupy.loader.plan import PlanError
    from aircupy.model.cuda_streamed import StreamedCudaModel
    from aircupy.model.stream_placement import StreamPlacement
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path / "m.gguf", "llama3-8b", "Q4_0", n_layers=8, overrides=TINY, seed=1)
    g = GGUFFile(rep.path)
    c = ModelConfig.from_gguf(g)
    sp, _, _ = StreamPlacement.for_model(g, c, N_CTX, 512, 3)
    m = load_model(g, c, vram_budget=sp.total(3), n_ctx=N_CTX)
    assert isinstance(m, StreamedCudaModel) and len(m.resident_layers) == 3
    assert "streamed" in m.allocation_report()
    m.close()
    with pytest.raises(PlanError, match="minimum") as e:
        load_model(g, c, vram_budget=sp.total(0) // 4, n_ctx=N_CTX)
    assert "\n" not in str(e.value)
    g.close()
