"""Tiny random-weight GGUF models of every supported architecture, for forward-pass tests.

    path = write_tiny_model(tmp_path / "m.gguf", TINY["qwen3"])

Weights are float32 (token_embd optionally Q8_0), drawn from a seeded generator, laid out exactly as
llama.cpp's converter writes them (numpy shape (out, in); gemma norms with the +1 folded in). The
specs cover: GQA, head size != n_embd / n_head, q/k/v biases, QK-norm, untied output head, a quantized
embedding, llama3 rope_freqs, linear rope scaling, and Gemma3's sliding-window pattern.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from aircupy.gguf.ggml import GGMLType
from tests.helpers.gguf_build import T, write_gguf


@dataclass(frozen=True)
class TinySpec:
    arch: str
    n_layers: int = 3
    n_embd: int = 32
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int | None = None      # written as attention.key_length/value_length when set
    n_ff: int = 48
    vocab: int = 96
    rope_base: float = 10000.0
    tied: bool = True
    embd_q8: bool = False            # token_embd stored as Q8_0 (n_embd must be a multiple of 32)
    rope_freqs: bool = False         # llama3-style per-frequency divisors tensor
    linear_scale: float | None = None
    sliding_window: int | None = None
    seed: int = 0


TINY: dict[str, TinySpec] = {
    "llama": TinySpec("llama"),
    "llama_untied_scaled": TinySpec("llama", tied=False, embd_q8=True, rope_freqs=True, linear_scale=2.0, seed=1),
    "qwen2": TinySpec("qwen2", tied=False, seed=2),
    "qwen3": TinySpec("qwen3", head_dim=16, seed=3),
    "gemma3": TinySpec("gemma3", n_layers=6, n_head_kv=1, head_dim=16, sliding_window=4, rope_base=1e6, seed=4),
}


def _f32(name: str, a: np.ndarray) -> T:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return T(name, GGMLType.F32, a.shape, a.tobytes())


def write_tiny_model(path: Path, spec: TinySpec) -> Path:
    rng = np.random.default_rng(spec.seed)
    E, H, Hkv = spec.n_embd, spec.n_head, spec.n_head_kv
    D = spec.head_dim or E // H
    a = spec.arch

    def mat(out, inp, scale=None):
        return rng.standard_normal((out, inp)) * (scale or 1.0 / np.sqrt(inp))

    def norm(n):  # around 1, like trained norm weights (gemma's +1 included, as its GGUFs store it)
        return 1.0 + 0.2 * rng.standard_normal(n)

    md = {
        "general.architecture": a, f"{a}.block_count": spec.n_layers, f"{a}.embedding_length": E,
        f"{a}.feed_forward_length": spec.n_ff, f"{a}.attention.head_count": H,
        f"{a}.attention.head_count_kv": Hkv, f"{a}.rope.freq_base": float(spec.rope_base),
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6, f"{a}.context_length": 256,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    if spec.head_dim:
        md[f"{a}.attention.key_length"] = D
        md[f"{a}.attention.value_length"] = D
    if spec.linear_scale:
        md[f"{a}.rope.scaling.type"] = "linear"
        md[f"{a}.rope.scaling.factor"] = float(spec.linear_scale)
    if spec.sliding_window:
        md[f"{a}.attention.sliding_window"] = spec.sliding_window

    embd = rng.standard_normal((spec.vocab, E)).astype(np.float32)
    if spec.embd_q8:
        q = gguf.quants.quantize(embd, gguf.GGMLQuantizationType.Q8_0)
        tensors = [T("token_embd.weight", GGMLType.Q8_0, (spec.vocab, E), q.tobytes())]
    else:
        tensors = [_f32("token_embd.weight", embd)]
    tensors.append(_f32("output_norm.weight", norm(E)))
    if not spec.tied:
        tensors.append(_f32("output.weight", mat(spec.vocab, E)))
    if spec.rope_freqs:
        tensors.append(_f32("rope_freqs.weight", np.linspace(1.0, 6.0, D // 2)))
    for i in range(spec.n_layers):
        b = f"blk.{i}."
        tensors += [
            _f32(b + "attn_norm.weight", norm(E)),
            _f32(b + "attn_q.weight", mat(H * D, E)), _f32(b + "attn_k.weight", mat(Hkv * D, E)),
            _f32(b + "attn_v.weight", mat(Hkv * D, E)), _f32(b + "attn_output.weight", mat(E, H * D)),
            _f32(b + "ffn_norm.weight", norm(E)),
            _f32(b + "ffn_gate.weight", mat(spec.n_ff, E)), _f32(b + "ffn_up.weight", mat(spec.n_ff, E)),
            _f32(b + "ffn_down.weight", mat(E, spec.n_ff)),
        ]
        if a == "qwen2":
            tensors += [_f32(b + f"attn_{x}.bias", 0.3 * rng.standard_normal(n))
                        for x, n in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D))]
        if a in ("qwen3", "gemma3"):
            tensors += [_f32(b + "attn_q_norm.weight", norm(D)), _f32(b + "attn_k_norm.weight", norm(D))]
        if a == "gemma3":
            tensors += [_f32(b + "post_attention_norm.weight", norm(E)), _f32(b + "post_ffw_norm.weight", norm(E))]
    return write_gguf(path, metadata=md, tensors=tensors)


def without_window(spec: TinySpec) -> TinySpec:
    return replace(spec, sliding_window=None)
