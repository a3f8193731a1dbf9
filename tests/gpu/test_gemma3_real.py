"""GPU tier: the real Gemma3 270M (Q4_K_M: Q8_0, Q5_0, Q4_K, Q6_K, F32) against the numpy reference.

Gemma3 is the architecture with the most special cases: embeddings scaled by sqrt(n_embd), QK-norm,
post-norms, GeGLU, a local rope base and sliding-window attention on five of every six layers, and
activations whose range needs bf16 GEMM operands and fp32 everywhere else. Two runs, each a prefill
then 16 greedy steps, the ids equal and every step's logits within LOGIT_RTOL x RMS(reference) (the
tolerance of test_cuda_model.py; the prefill is compared at its last row only, as a full 262,144-wide
logit matrix per row would be gigabytes):
  - the real 512-position window, crossed by a 560-token prompt (two prefill chunks) and every step;
  - the window shrunk to 24 (same weights, config changed in both models), crossed during decode.
Prompts count ("1, 2, 3, ..."), so the continuation is certain and its top-2 margins wide: on the
numpy reference at least 2.1 (window 24) and 9.0 (window 512) against tolerances under 0.1 (random
ids, or prose at a sentence's end, give near-ties no tolerance can decide). Test names say gemma3_real: bench/device_session.sh
runs them where the file was carried ($AIRCUPY_GEMMA3_GGUF).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

LOGIT_RTOL = 0.02
STEPS = 16
COUNTING = ", ".join(str(i) for i in range(1, 400))


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    from aircupy.config import ModelConfig
    from aircupy.cuda.kernels import KernelLibrary
    from aircupy.gguf.reader import GGUFFile
    from aircupy.gguf.tokenizer import Tokenizer
    g = GGUFFile(gemma3_path)
    c = ModelConfig.from_gguf(g)
    assert c.arch == "gemma3" and c.sliding_window == 512 and any(c.swa_layers)
    lib = KernelLibrary()
    lib.warmup()
    yield g, c, Tokenizer.from_gguf(g), lib
    g.close()


def _prompt(tok, n_tokens):
    ids = tok.encode(COUNTING)
    assert len(ids) >= n_tokens
    return np.asarray(ids[:n_tokens], np.int32)


def _run(model, prompt, n_ctx):
    """Last-row logits of the prefill, then STEPS greedy single-token steps: (ids, [logits (V,)])."""
    cache = model.new_cache(n_ctx)
    logits = [model.forward(prompt, np.arange(len(prompt), dtype=np.int32), cache)[-1]]
    ids = []
    for _ in range(STEPS):
        ids.append(int(logits[-1].argmax()))
        logits.append(model.forward(np.array([ids[-1]], np.int32), np.array([cache.length], np.int32),
                                    cache)[-1])
    return ids, logits


def _compare(c, g, lib, prompt, n_ctx):
    from aircupy.cuda.model import CudaModel
    from aircupy.reference.model import NumpyModel
    ref_ids, ref_logits = _run(NumpyModel(g, c), prompt, n_ctx)
    gpu = CudaModel(g, c, n_ctx, lib=lib)
    try:
        ids, logits = _run(gpu, prompt, n_ctx)
    finally:
        gpu.close()
    worst = 0.0
    for i, (r, x) in enumerate(zip(ref_logits, logits)):
        assert x.shape == r.shape and np.isfinite(x).all()
        tol = LOGIT_RTOL * float(np.sqrt(np.mean(r.astype(np.float64) ** 2)))
        err = float(np.abs(x - r).max())
        worst = max(worst, err / tol)
        assert err <= tol, f"step {i}: max |logit diff| {err:.4g} > {tol:.4g}"
    if ids != ref_ids:
        i = next(i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b)
        top2 = np.sort(ref_logits[i])[-2:]
        pytest.fail(f"greedy ids differ at step {i}: {ids} vs {ref_ids}; reference top-2 margin "
                    f"{top2[1] - top2[0]:.4g}, worst logit error {worst:.3g} x tol")
    print(f"GEMMA3 window {c.sliding_window}, prompt {len(prompt)}: max |diff| / tol = {worst:.4f}")
    return ids


def test_gemma3_real_on_the_gpu_crosses_its_512_window(gemma3):
    g, c, tok, lib = gemma3
    prompt = _prompt(tok, 560)
    assert len(prompt) == 560 > c.sliding_window
    _compare(c, g, lib, prompt, 560 + STEPS + 8)


def test_gemma3_real_on_the_gpu_with_the_window_shrunk_to_24(gemma3):
    g, c, tok, lib = gemma3
    small = replace(c, sliding_window=24)
    prompt = _prompt(tok, 22)          # 22 + 16 steps: the window is crossed during decode
    _compare(small, g, lib, prompt, 64)
