"""A deliberately plain forward pass, the oracle for the tiny-model tests: independent of aircupy.

It reads the file with gguf-py (GGUFReader + gguf.quants.dequantize), computes in float64 one token at a
time with Python loops over heads, and follows the HF modeling code's conventions rather than ours:
llama Q/K weights are un-permuted back to HF's layout (as transformers' GGUF loader does) and rotated
with rotate_half; Gemma3 layer i is global iff i % 6 == 5, local layers use rope base 10000 and see the
last `sliding_window` positions (HF Gemma3 defaults).

    naive_logits(path, token_ids) -> (T, vocab) float64, logits at every position
"""
from __future__ import annotations

import math

import gguf
import numpy as np


def _weights(path):
    r = gguf.GGUFReader(path)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    return md, w


def _rms(x, g, eps):
    return x / math.sqrt(float(np.mean(x * x)) + eps) * g


def _unpermute(w, n_head):  # transformers' LlamaTensorProcessor._reverse_permute_weights
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, -1).swapaxes(2, 1).reshape(w.shape)


def _rope_half(x, pos, base, scale, freq_factors):
    """HF rotate_half rope on one head x (D,) at position pos."""
    D = x.shape[0]
    h = D // 2
    out = x.copy()
    for i in range(h):
        th = pos * scale * base ** (-2.0 * i / D)
        if freq_factors is not None:
            th /= freq_factors[i]
        c, s = math.cos(th), math.sin(th)
        out[i] = x[i] * c - x[i + h] * s
        out[i + h] = x[i + h] * c + x[i] * s
    return out


def naive_logits(path, token_ids) -> np.ndarray:
    md, w = _weights(path)
    a = md["general.architecture"]
    E, L = int(md[f"{a}.embedding_length"]), int(md[f"{a}.block_count"])
    H, Hkv = int(md[f"{a}.attention.head_count"]), int(md[f"{a}.attention.head_count_kv"])
    D = int(md.get(f"{a}.attention.key_length", E // H))
    eps = float(md[f"{a}.attention.layer_norm_rms_epsilon"])
    base = float(md[f"{a}.rope.freq_base"])
    scale = 1.0 / float(md[f"{a}.rope.scaling.factor"]) if f"{a}.rope.scaling.factor" in md else 1.0
    window = md.get(f"{a}.attention.sliding_window")
    gemma = a == "gemma3"
    ff = w.get("rope_freqs.weight")
    head = w.get("output.weight", w["token_embd.weight"])
    act = (lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))) if gemma \
        else (lambda z: z / (1 + np.exp(-z)))

    keys = [[] for _ in range(L)]   # per layer: list of (Hkv, D) per past token
    vals = [[] for _ in range(L)]
    out = []
    for pos, tok in enumerate(token_ids):
        x = w["token_embd.weight"][tok].copy() * (math.sqrt(E) if gemma else 1.0)
        for i in range(L):
            p = f"blk.{i}."
            local = gemma and window is not None and i % 6 != 5
            h = _rms(x, w[p + "attn_norm.weight"], eps)
            wq, wk = w[p + "attn_q.weight"], w[p + "attn_k.weight"]
            if a == "llama":
                wq, wk = _unpermute(wq, H), _unpermute(wk, Hkv)
            q, k, v = wq @ h, wk @ h, w[p + "attn_v.weight"] @ h
            if p + "attn_q.bias" in w:
                q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
            q, k, v = q.reshape(H, D), k.reshape(Hkv, D), v.reshape(Hkv, D)
            if p + "attn_q_norm.weight" in w:
                q = np.stack([_rms(qh, w[p + "attn_q_norm.weight"], eps) for qh in q])
                k = np.stack([_rms(kh, w[p + "attn_k_norm.weight"], eps) for kh in k])
            b, s = (10000.0, 1.0) if local else (base, scale)
            q = np.stack([_rope_half(qh, pos, b, s, ff) for qh in q])
            k = np.stack([_rope_half(kh, pos, b, s, ff) for kh in k])
            keys[i].append(k)
            vals[i].append(v)
            first = max(0, pos - window + 1) if local else 0
            att = np.zeros((H, D))
            for hh in range(H):
                kv = hh // (H // Hkv)
                sc = np.array([q[hh] @ keys[i][j][kv] / math.sqrt(D) for j in range(first, pos + 1)])
                pr = np.exp(sc - sc.max())
                pr /= pr.sum()
                att[hh] = sum(pj * vals[i][j][kv] for pj, j in zip(pr, range(first, pos + 1)))
            o = w[p + "attn_output.weight"] @ att.reshape(-1)
            if gemma:
                o = _rms(o, w[p + "post_attention_norm.weight"], eps)
            x = x + o
            h = _rms(x, w[p + "ffn_norm.weight"], eps)
            d = w[p + "ffn_down.weight"] @ (act(w[p + "ffn_gate.weight"] @ h) * (w[p + "ffn_up.weight"] @ h))
            if gemma:
                d = _rms(d, w[p + "post_ffw_norm.weight"], eps)
            x = x + d
        out.append(head @ _rms(x, w["output_norm.weight"], eps))
    return np.array(out)
