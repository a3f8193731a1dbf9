"""GPU tier: tiny synthetic models end to end in every quantized type the CUDA backend computes with
(gguf.ggml.SUPPORTED_COMPUTE, so a type added there is tested here) and in llama.cpp's Q4_K_M mix,
against the numpy reference. The GPU model is fed the reference's own greedy ids (teacher forcing:
the prompt with all logits, then 16 single-token steps), and every step's logits must be within
test_cuda_model's tolerance, LOGIT_RTOL x RMS(reference); its argmax must equal the reference's at
every step whose top-2 margin exceeds twice the tolerance (where the tolerance decides it: random
tiny models have near-ties, e.g. a 0.006 margin for Q5_0 below, where a free-running greedy
comparison would test the tie, not the kernels). test_cuda_model.py covers five of these types
free-running on every architecture; this covers all of them on the llama shape, and the mix on two
shapes:
  - llama, 8 layers: Q6_K head, Q6_K attn_v/ffn_down on layers 0, 3, 6, 7 (use_more_bits), Q4_K
    elsewhere;
  - gemma3 with the real 270M's widths (640-wide rows, 256-wide heads): the fallbacks too, as in the
    real file (Q5_0 for Q4_K rows of 640, a Q8_0 tied head, Q4_K/Q6_K ffn_down of 2048-wide rows),
    with an 8-token window that the 24-token run crosses.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.gguf.ggml import SUPPORTED_COMPUTE, GGMLType
from tests.gpu.test_cuda_model import LOGIT_RTOL, STEPS, TINY, _load

pytestmark = pytest.mark.gpu

QUANT_TYPES = sorted(t.name for t in SUPPORTED_COMPUTE
                     if t not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16))


@pytest.fixture(scope="module")
def lib():
    from aircupy.cuda.kernels import KernelLibrary
    lib = KernelLibrary()
    lib.warmup()
    return lib


def _forced(model, prompt, ids):
    """All logits of the prompt, then the logits (1, V) after each of `ids` fed in turn."""
    cache = model.new_cache(len(prompt) + len(ids) + 1)
    out = [model.forward(np.asarray(prompt, np.int32), np.arange(len(prompt), dtype=np.int32), cache,
                         all_logits=True)]
    for t in ids:
        out.append(model.forward(np.array([t], np.int32), np.array([cache.length], np.int32), cache))
    return out


def _check(path, lib, seed=5):
    g, c, ref, gpu = _load(path, lib)
    try:
        prompt = list(np.random.default_rng(seed).integers(4, c.vocab_size, 8))
        ids = []                                          # the reference runs free: its greedy ids
        cache = ref.new_cache(len(prompt) + STEPS + 1)
        ref_logits = [ref.forward(np.asarray(prompt, np.int32), np.arange(len(prompt), dtype=np.int32),
                                  cache, all_logits=True)]
        for _ in range(STEPS):
            ids.append(int(ref_logits[-1][-1].argmax()))
            ref_logits.append(ref.forward(np.array([ids[-1]], np.int32),
                                          np.array([cache.length], np.int32), cache))
        gpu_logits = _forced(gpu, prompt, ids)
        decided, worst = 0, 0.0
        for i, (r, x) in enumerate(zip(ref_logits, gpu_logits)):
            assert x.shape == r.shape and np.isfinite(x).all()
            tol = LOGIT_RTOL * float(np.sqrt(np.mean(r.astype(np.float64) ** 2)))
            err = float(np.abs(x - r).max())
            worst = max(worst, err / tol)
            assert err <= tol, f"step {i}: max |logit diff| {err:.4g} > {tol:.4g}"
            top2 = np.sort(r[-1])[-2:]
            if top2[1] - top2[0] > 2 * tol:
                decided += 1
                assert int(x[-1].argmax()) == int(r[-1].argmax()), f"step {i}: argmax differs"
        print(f"QTYPE {path.name}: max |logit diff| / tol = {worst:.4f}, argmax checked at "
              f"{decided}/{STEPS + 1} steps")
    finally:
        gpu.close()
        g.close()


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_every_supported_quant_type_matches_numpy(tmp_path, lib, qtype):
    from aircupy.gguf.reader import GGUFFile
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path / "m.gguf", "llama3-8b", qtype, n_layers=2, overrides=TINY, seed=11,
                      logit_std=8.0)
    with GGUFFile(rep.path) as g:          # every matrix really is of that type (no fallback)
        assert {t.ggml_type.name for n, t in g.tensors.items() if len(t.shape) == 2} == {qtype}
    _check(rep.path, lib)


@pytest.mark.parametrize("preset,n_layers,over", [
    ("llama3-8b", 8, TINY),
    ("gemma3-270m", 6, {"vocab": 512, "n_embd": 640, "n_head": 4, "n_head_kv": 1, "head_dim": 256,
                        "n_ff": 2048, "sliding_window": 8})])
def test_q4_k_m_mix_matches_numpy(tmp_path, lib, preset, n_layers, over):
    from aircupy.gguf.reader import GGUFFile
    from aircupy.synth import synth_model
    rep = synth_model(tmp_path / "m.gguf", preset, "Q4_K_M", n_layers=n_layers, overrides=over,
                      seed=11, logit_std=8.0)
    with GGUFFile(rep.path) as g:
        types = {t.ggml_type.name for t in g.tensors.values() if len(t.shape) == 2}
    want = {"Q4_K", "Q6_K"} if preset == "llama3-8b" else {"Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    assert types == want
    _check(rep.path, lib)
