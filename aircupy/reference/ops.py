"""The numpy reference of every op: plain, float32, readable. Each GPU kernel is tested against these.

Shapes: T = tokens in this step, S = keys visible (cache + new), H = query heads, Hkv = kv heads,
D = head size, E = model width. Everything is float32; rope angles are computed in float64 first
(position * frequency loses ~1e-4 rad in float32 at position 1000) and then rounded.
"""
from __future__ import annotations

import math

import numpy as np

from aircupy.config import RopeScaling
from aircupy.gguf.ggml import GGMLType, row_nbytes
from aircupy.gguf.quants import dequantize

# Below this many rows linear() runs one gemv per row rather than one gemm (see linear()).
_GEMV_ROWS = 4
# Query rows per attention block: bounds the (Hkv, G*rows, S) score matrix of a long prefill.
_ATTN_QUERY_BLOCK = 256


# --- embeddings and projections -------------------------------------------------------------------

def embedding(data: np.ndarray, ggml_type: GGMLType, shape: tuple[int, int], ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a (vocab, E) tensor stored as ggml blocks in `data` (uint8, row-major), dequantized
    without touching the other rows. -> (len(ids), E) float32."""
    vocab, n = int(shape[0]), int(shape[1])
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise IndexError(f"token id out of range [0, {vocab})")
    rows = np.asarray(data, dtype=np.uint8).reshape(vocab, row_nbytes(ggml_type, n))[ids]
    return dequantize(np.ascontiguousarray(rows).reshape(-1), ggml_type, (len(ids), n))


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x (T, in) @ w.T with w (out, in) as GGUF stores it (numpy order), plus bias (out,). -> (T, out),
    a transposed view of a (out, T) result.

    Computed as (w @ x.T).T: the same products, but with OpenBLAS (SkylakeX kernels) the weight-major
    orientation is 1.3-3x faster for the few-row matmuls of a decode batch (T = 4..32: it is what sets
    the cost of a batched decode step), and no slower for a prefill. T = 1 is a gemv, which streams the
    weights; a gemm first packs them, and costs ~3.5 gemvs whether T is 2 or 8, so T = 2 or 3 rows
    run as T gemvs (a batch of two would otherwise decode slower than one sequence alone)."""
    if 0 < x.shape[0] < _GEMV_ROWS:
        y = np.stack([w @ r for r in x])
    else:
        y = (w @ x.T).T
    if b is not None:
        y += b
    return y


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight. Also the per-head QK-norm when
    x is (T, H, D) and weight is (D,). (Gemma's `1 + w` is already folded into the GGUF weights.)"""
    x = np.asarray(x, dtype=np.float32)
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))) * weight


# --- activations ------------------------------------------------------------------------------------

def silu(x: np.ndarray) -> np.ndarray:
    # sigmoid(x) = (1 + tanh(x/2)) / 2 never overflows, unlike 1 / (1 + exp(-x)).
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (PyTorch's approximate='tanh'; Gemma's hidden_activation)."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * up


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gelu_tanh(gate) * up


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): Gemma-2 style logit soft-capping."""
    return np.float32(cap) * np.tanh(x / np.float32(cap))


# --- rotary position embedding ------------------------------------------------------------------------

def _yarn_corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    # the pair index whose wavelength completes n_rot turns over the original context (ggml's formula)
    return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_angles(positions: np.ndarray, rope_dim: int, base: float, scaling: RopeScaling = RopeScaling(),
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (T, rope_dim // 2) float32, for rotating pair i of a head at each position.

    theta_i = pos * base^(-2i/rope_dim) / freq_factors[i]  (freq_factors: llama3's rope_freqs tensor)
    linear scaling: theta *= 1/factor. yarn (ggml_rope_yarn): blend interpolated and extrapolated theta
    with a ramp over the pair index, and scale cos/sin by attn_factor * (1 + 0.1 ln factor).
    """
    half = rope_dim // 2
    i = np.arange(half, dtype=np.float64)
    inv_freq = base ** (-2.0 * i / rope_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)[:half]
    theta_extrap = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    mscale = 1.0
    if scaling.kind == "yarn":
        fs = scaling.freq_scale
        theta_interp = fs * theta_extrap
        low = max(0.0, math.floor(_yarn_corr_dim(rope_dim, scaling.orig_ctx, scaling.yarn_beta_fast, base)))
        high = min(rope_dim - 1.0, math.ceil(_yarn_corr_dim(rope_dim, scaling.orig_ctx, scaling.yarn_beta_slow, base)))
        ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)  # 1 = keep extrapolated
        mix = ramp * scaling.yarn_ext_factor
        theta = theta_interp * (1.0 - mix) + theta_extrap * mix
        mscale = scaling.attn_factor
        if scaling.yarn_ext_factor != 0.0:
            mscale *= 1.0 + 0.1 * math.log(1.0 / fs)
    else:
        theta = theta_extrap * scaling.freq_scale
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_type: str) -> np.ndarray:
    """Rotate the first rope_dim = 2 * cos.shape[-1] dims of each head of x (T, H, D); cos/sin (T, rope_dim/2).

    "norm" (llama.cpp's llama layout): pairs are adjacent dims (2i, 2i+1).
    "neox" (HF layout, qwen/gemma): pair i is (i, i + rope_dim/2).
    """
    half = cos.shape[-1]
    rd = 2 * half
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, rope_dim/2) broadcast over heads
    out = np.array(x, dtype=np.float32, copy=True)
    if rope_type == "norm":
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = a * c - b * s
        out[..., 1:rd:2] = a * s + b * c
    elif rope_type == "neox":
        a, b = x[..., :half], x[..., half:rd]
        out[..., :half] = a * c - b * s
        out[..., half:rd] = a * s + b * c
    else:
        raise ValueError(f"unknown rope type {rope_type!r}")
    return out


def rope_kv_store(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache_k: np.ndarray, cache_v: np.ndarray,
                  pos: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_type: str,
                  seq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fused decode-step op: rotate q (T, H, D) and k (T, Hkv, D), then store the rotated k and v
    as float16 at cache[seq[t], :, pos[t]] (caches (n_seq, Hkv, n_ctx, D); seq None: sequence 0).
    Returns new (q, k, cache_k, cache_v); the inputs are left unchanged."""
    q2, k2 = apply_rope(q, cos, sin, rope_type), apply_rope(k, cos, sin, rope_type)
    ck, cv = np.array(cache_k, copy=True), np.array(cache_v, copy=True)
    for t, p in enumerate(np.asarray(pos)):
        s = 0 if seq is None else int(seq[t])
        ck[s, :, int(p)] = k2[t].astype(np.float16)
        cv[s, :, int(p)] = np.asarray(v[t], dtype=np.float32).astype(np.float16)
    return q2, k2, ck, cv


# --- attention -----------------------------------------------------------------------------------

def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None = None) -> np.ndarray:
    """(T, S) bool, True = may attend: causal (k_pos <= q_pos) and, with a sliding window,
    q_pos - k_pos < window (llama.cpp's LLAMA_SWA_TYPE_STANDARD; HF's sliding_window).
    k_pos is (S,), shared by every query, or (T, S), each query's own keys (attention_rows)."""
    k_pos = np.asarray(k_pos, dtype=np.int64)
    d = np.asarray(q_pos, dtype=np.int64)[:, None] - (k_pos if k_pos.ndim == 2 else k_pos[None, :])
    ok = d >= 0
    if window is not None:
        ok &= d < window
    return ok


def _attention_probs(scores: np.ndarray, mask: np.ndarray, scale: float,
                     softcap_value: float | None) -> np.ndarray:
    """The one softmax formula of both attention ops: raw q.k scores (..., S) -> probabilities,
    softmax(mask ? softcap(scores * scale) : -inf) over the last axis; mask broadcasts to scores."""
    scores = scores * np.float32(scale)
    if softcap_value:
        scores = softcap(scores, softcap_value)
    scores = np.where(mask, scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              scale: float, window: int | None = None, softcap_value: float | None = None) -> np.ndarray:
    """Grouped-query attention.

    q (T, H, D); k (Hkv, S, D) and v (Hkv, S, Dv) in the KV cache's head-major layout; query head h reads
    kv head h // (H // Hkv). Returns (T, H * Dv) float32, heads concatenated as the output projection
    expects. Queries are processed in blocks so a long prefill never builds a (H, T, S) matrix whole.
    """
    T, H, D = q.shape
    hkv, S, dv = v.shape
    g = H // hkv
    out = np.empty((T, H, dv), dtype=np.float32)
    for t0 in range(0, T, _ATTN_QUERY_BLOCK):
        t1 = min(T, t0 + _ATTN_QUERY_BLOCK)
        n = t1 - t0
        # (n, H, D) -> (Hkv, G*n, D): one batched matmul per kv head covers its whole query group
        qb = q[t0:t1].reshape(n, hkv, g, D).transpose(1, 2, 0, 3).reshape(hkv, g * n, D)
        scores = (qb @ k.transpose(0, 2, 1)).reshape(hkv, g, n, S)
        mask = attention_mask(q_pos[t0:t1], k_pos, window)  # (n, S)
        p = _attention_probs(scores, mask, scale, softcap_value)
        o = p.reshape(hkv, g * n, S) @ v  # (Hkv, G*n, Dv)
        out[t0:t1] = o.reshape(hkv, g, n, dv).transpose(2, 0, 1, 3).reshape(n, H, dv)
    return out.reshape(T, H * dv)


def attention_rows(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
                   scale: float, window: int | None = None, softcap_value: float | None = None) -> np.ndarray:
    """n independent one-query attentions, each over its own keys: a batch of decode rows of different
    sequences in one pass (batched matmuls) instead of one attention() call per row.

    q (n, H, D); k (n, Hkv, S, D), v (n, Hkv, S, Dv); q_pos (n,); k_pos (n, S) the position of each key,
    -1 for padding (rows with fewer than S keys). Row r equals attention(q[r:r+1], k[r][:, :S_r], ...)
    over its valid keys. Returns (n, H * Dv) float32.
    """
    n, H, D = q.shape
    _, hkv, S, dv = v.shape
    g = H // hkv
    scores = q.reshape(n, hkv, g, D) @ k.transpose(0, 1, 3, 2)  # (n, Hkv, G, S)
    k_pos = np.asarray(k_pos, dtype=np.int64)
    mask = attention_mask(q_pos, k_pos, window) & (k_pos >= 0)   # (n, S)
    p = _attention_probs(scores, mask[:, None, None, :], scale, softcap_value)
    return (p @ v).reshape(n, H * dv)  # (n, Hkv, G, Dv): heads in order h = kv * G + j
