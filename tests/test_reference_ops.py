"""The numpy reference ops against plain, independent formulations (float64 loops, gguf-py)."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from aircupy.config import RopeScaling
from aircupy.gguf.ggml import GGMLType
from aircupy.reference import ops as ref

RNG = np.random.default_rng(1234)


def _rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_embedding_dequantizes_only_the_rows_asked_for():
    table = _rand(40, 64)
    q = gguf.quants.quantize(table, gguf.GGMLQuantizationType.Q8_0)  # (40, 68) uint8 blocks
    full = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    ids = np.array([3, 0, 39, 3, 17])
    got = ref.embedding(q.reshape(-1), GGMLType.Q8_0, (40, 64), ids)
    assert got.dtype == np.float32 and got.shape == (5, 64)
    np.testing.assert_array_equal(got, full[ids])
    with pytest.raises(IndexError):
        ref.embedding(q.reshape(-1), GGMLType.Q8_0, (40, 64), np.array([40]))


def test_linear_and_rms_norm_match_float64_formulas():
    x, w, b = _rand(5, 24), _rand(7, 24), _rand(7)
    np.testing.assert_allclose(ref.linear(x, w, b), x.astype(np.float64) @ w.T.astype(np.float64) + b,
                               rtol=1e-5, atol=1e-5)
    g = _rand(24)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(ref.rms_norm(x, g, 1e-6), want, rtol=1e-5, atol=1e-6)
    # per-head QK-norm: (T, H, D) with a (D,) weight normalizes each head on its own
    xh = _rand(3, 4, 6)
    gh = _rand(6)
    np.testing.assert_allclose(ref.rms_norm(xh, gh, 1e-6)[1, 2], ref.rms_norm(xh[1, 2][None], gh, 1e-6)[0], rtol=1e-6)


def test_activations():
    x = np.linspace(-100, 100, 2001, dtype=np.float32)
    x64 = x.astype(np.float64)
    with np.errstate(all="raise"):  # no overflow warnings at the extremes
        s = ref.silu(x)
    np.testing.assert_allclose(s, x64 / (1 + np.exp(-x64)), rtol=1e-5, atol=1e-6)
    want = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    np.testing.assert_allclose(ref.gelu_tanh(x), want, rtol=1e-5, atol=1e-6)
    # the tanh approximation stays within 1e-3 of exact GELU
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x64[900:1100]])
    assert np.abs(ref.gelu_tanh(x[900:1100]) - exact).max() < 1e-3
    g, u = _rand(4, 8), _rand(4, 8)
    np.testing.assert_allclose(ref.swiglu(g, u), ref.silu(g) * u)
    np.testing.assert_allclose(ref.geglu(g, u), ref.gelu_tanh(g) * u)
    c = ref.softcap(np.array([-1e4, 0.0, 3.0, 1e4], np.float32), 30.0)
    np.testing.assert_allclose(c, [-30.0, 0.0, 30 * math.tanh(0.1), 30.0], rtol=1e-6)


def _rope_loop(x, positions, base, rope_type, rope_dim=None):
    """One pair at a time, in float64, the way the papers write it."""
    T, H, D = x.shape
    rd = rope_dim or D
    out = x.astype(np.float64).copy()
    for t in range(T):
        for h in range(H):
            for i in range(rd // 2):
                th = positions[t] * base ** (-2 * i / rd)
                a, b = (2 * i, 2 * i + 1) if rope_type == "norm" else (i, i + rd // 2)
                xa, xb = x[t, h, a], x[t, h, b]
                out[t, h, a] = xa * math.cos(th) - xb * math.sin(th)
                out[t, h, b] = xa * math.sin(th) + xb * math.cos(th)
    return out


@pytest.mark.parametrize("rope_type", ["norm", "neox"])
@pytest.mark.parametrize("rope_dim", [16, 8])
def test_rope_matches_pairwise_loop(rope_type, rope_dim):
    x = _rand(5, 3, 16)
    pos = np.array([0, 1, 7, 100, 3000])
    cos, sin = ref.rope_angles(pos, rope_dim, 10000.0)
    got = ref.apply_rope(x, cos, sin, rope_type)
    np.testing.assert_allclose(got, _rope_loop(x, pos, 10000.0, rope_type, rope_dim), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity
    if rope_dim < 16:
        np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])  # partial rotary


def test_norm_rope_on_permuted_weights_equals_neox_on_hf_weights():
    """llama.cpp's converter permutes Q/K rows so that adjacent-pair rope equals HF's rotate_half rope."""
    D, H = 8, 2
    w_hf = _rand(H * D, 12)
    w_gguf = w_hf.reshape(H, 2, D // 2, 12).swapaxes(1, 2).reshape(H * D, 12)  # convert_hf_to_gguf permute
    x = _rand(3, 12)
    cos, sin = ref.rope_angles(np.array([2, 5, 9]), D, 10000.0)
    q_norm = ref.apply_rope((x @ w_gguf.T).reshape(3, H, D), cos, sin, "norm")
    q_neox = ref.apply_rope((x @ w_hf.T).reshape(3, H, D), cos, sin, "neox")
    unpermute = q_norm.reshape(3, H, D // 2, 2).swapaxes(2, 3).reshape(3, H, D)
    np.testing.assert_allclose(unpermute, q_neox, rtol=1e-5, atol=1e-6)


def test_rope_scaling_linear_and_freq_factors():
    pos = np.arange(0, 64, 7)
    lin = ref.rope_angles(pos, 16, 10000.0, RopeScaling(kind="linear", factor=4.0))
    plain = ref.rope_angles(pos / 4.0, 16, 10000.0)
    np.testing.assert_allclose(lin[0], plain[0], atol=1e-6)
    np.testing.assert_allclose(lin[1], plain[1], atol=1e-6)
    # llama3's rope_freqs tensor divides each pair's frequency
    ff = np.linspace(1, 8, 8).astype(np.float32)
    c, s = ref.rope_angles(pos, 16, 10000.0, freq_factors=ff)
    theta = pos[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)[None, :] / ff
    np.testing.assert_allclose(c, np.cos(theta), atol=1e-6)
    np.testing.assert_allclose(s, np.sin(theta), atol=1e-6)


def test_rope_yarn_matches_ggml_formula():
    sc = RopeScaling(kind="yarn", factor=4.0, orig_ctx=64, attn_factor=1.0, yarn_ext_factor=1.0,
                     yarn_beta_fast=32.0, yarn_beta_slow=1.0)
    rd, base, pos = 32, 10000.0, np.array([0, 5, 300])
    cos, sin = ref.rope_angles(pos, rd, base, sc)
    # ggml_rope_yarn_corr_dims + rope_yarn written out per pair
    corr = lambda beta: rd * math.log(64 / (beta * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(0, math.floor(corr(32.0))), min(rd - 1, math.ceil(corr(1.0)))
    mscale = 1 + 0.1 * math.log(4.0)
    for t, p in enumerate(pos):
        for i in range(rd // 2):
            ext = p * base ** (-2 * i / rd)
            ramp = 1 - min(1.0, max(0.0, (i - lo) / max(0.001, hi - lo)))
            th = ext / 4.0 * (1 - ramp) + ext * ramp
            assert cos[t, i] == pytest.approx(math.cos(th) * mscale, abs=1e-5)
            assert sin[t, i] == pytest.approx(math.sin(th) * mscale, abs=1e-5)
    # the fastest pairs keep their frequency, the slowest are interpolated
    c0, _ = ref.rope_angles(pos, rd, base)
    assert cos[2, 0] == pytest.approx(c0[2, 0] * mscale, abs=1e-5)
    assert cos[2, -1] == pytest.approx(math.cos(300 / 4.0 * base ** (-(rd - 2) / rd)) * mscale, abs=1e-5)


def _attention_loop(q, k, v, q_pos, k_pos, scale, window=None, cap=None):
    """Per query, per head, in float64: k/v given as (S, Hkv, D)."""
    T, H, D = q.shape
    g = H // k.shape[1]
    out = np.zeros((T, H, v.shape[2]))
    for t in range(T):
        for h in range(H):
            keep = [j for j in range(len(k_pos)) if k_pos[j] <= q_pos[t] and (window is None or q_pos[t] - k_pos[j] < window)]
            s = np.array([q[t, h].astype(np.float64) @ k[j, h // g] * scale for j in keep])
            if cap:
                s = cap * np.tanh(s / cap)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = sum(pj * v[j, h // g] for pj, j in zip(p, keep))
    return out.reshape(T, -1)


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 5.0)])
def test_attention_gqa_causal_window_softcap(window, cap):
    T, S, H, Hkv, D = 4, 9, 6, 2, 8
    q, k, v = _rand(T, H, D), _rand(S, Hkv, D), _rand(S, Hkv, D)
    k_pos = np.arange(S)
    q_pos = k_pos[-T:]
    got = ref.attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), q_pos, k_pos, 0.3, window, cap)
    assert got.shape == (T, H * D) and got.dtype == np.float32
    np.testing.assert_allclose(got, _attention_loop(q, k, v, q_pos, k_pos, 0.3, window, cap), rtol=1e-4, atol=1e-5)


def test_attention_blocks_long_prefill_like_one_pass():
    """More queries than one block: blocking must not change the result."""
    T, H, D = ref._ATTN_QUERY_BLOCK + 37, 2, 4
    q, k, v = _rand(T, H, D), _rand(1, T, D), _rand(1, T, D)
    pos = np.arange(T)
    got = ref.attention(q, k, v, pos, pos, 0.5, window=50)
    rows = [0, ref._ATTN_QUERY_BLOCK - 1, ref._ATTN_QUERY_BLOCK, T - 1]
    want = _attention_loop(q[rows], k.transpose(1, 0, 2), v.transpose(1, 0, 2), pos[rows], pos, 0.5, 50)
    np.testing.assert_allclose(got[rows], want, rtol=1e-4, atol=1e-5)


def test_attention_mask():
    m = ref.attention_mask(np.array([2, 5]), np.arange(6), window=3)
    assert m.tolist() == [[True, True, True, False, False, False], [False, False, False, True, True, True]]
