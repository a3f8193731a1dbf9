"""Shapes, tensor names and metadata of real architectures, as llama.cpp's converters write them.

Tensor shapes are numpy order (rows, cols) = (out_features, in_features); GGUF stores them reversed.
Per layer i (names as in llama.cpp's gguf-py constants):
    blk.i.attn_norm.weight (E,)        blk.i.attn_q.weight (H*D, E)   blk.i.attn_k/v.weight (Hkv*D, E)
    blk.i.attn_output.weight (E, H*D)  blk.i.ffn_norm.weight (E,)     blk.i.ffn_gate/up.weight (F, E)
    blk.i.ffn_down.weight (E, F)
  qwen2:  + attn_q/k/v.bias (H*D,), (Hkv*D,)
  qwen3:  + attn_q_norm.weight, attn_k_norm.weight (D,)
  gemma3: + attn_q_norm, attn_k_norm (D,), post_attention_norm, post_ffw_norm (E,)
  mixtures of experts (X experts, F_x = expert width: n_ff_exp, or n_ff for Mixtral-style llama), in
  place of ffn_gate/up/down: blk.i.ffn_gate_inp.weight (X, E) F32 (llama.cpp never quantizes the router),
    blk.i.ffn_gate_exps/ffn_up_exps.weight (X, F_x, E), blk.i.ffn_down_exps.weight (X, E, F_x)
  qwen2moe: + the shared expert ffn_gate_inp_shexp.weight (1, E) F32 (HF's Linear(E, 1), as the
    converter writes it), ffn_gate_shexp/ffn_up_shexp.weight (S, E), ffn_down_shexp.weight (E, S)
Global: token_embd.weight (V, E), output_norm.weight (E,), output.weight (V, E) unless tied.
All tensors of a layer are contiguous in the file (the streaming manifest reads one window per layer).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType


@dataclass(frozen=True)
class ArchShape:
    arch: str          # general.architecture
    vocab: int
    n_embd: int
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int
    rope_base: float
    rms_eps: float
    tied: bool         # no output.weight: the head reuses token_embd
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    sliding_window: int | None = None
    add_bos: bool = True
    n_expert: int = 0      # routed experts per layer (0: dense FFN)
    n_expert_used: int = 0
    n_ff_exp: int = 0      # expert width (qwen*moe); 0: n_ff (Mixtral-style llama)
    n_ff_shexp: int = 0    # shared expert width (qwen2moe)

    @property
    def expert_width(self) -> int:
        return self.n_ff_exp or self.n_ff


PRESETS: dict[str, ArchShape] = {
    "llama3-8b": ArchShape("llama", 128256, 4096, 32, 32, 8, 128, 14336, 8192, 500000.0, 1e-5,
                           tied=False),
    "llama-70b": ArchShape("llama", 128256, 8192, 80, 64, 8, 128, 28672, 8192, 500000.0, 1e-5,
                           tied=False),
    "smollm2-135m": ArchShape("llama", 49152, 576, 30, 9, 3, 64, 1536, 8192, 100000.0, 1e-5,
                              tied=True, add_bos=False),
    "qwen2-0.5b": ArchShape("qwen2", 151936, 896, 24, 14, 2, 64, 4864, 32768, 1000000.0, 1e-6,
                            tied=True, qkv_bias=True, add_bos=False),
    "qwen3-0.6b": ArchShape("qwen3", 151936, 1024, 28, 16, 8, 128, 3072, 40960, 1000000.0, 1e-6,
                            tied=True, qk_norm=True, add_bos=False),
    "gemma3-270m": ArchShape("gemma3", 262144, 640, 18, 4, 1, 256, 2048, 32768, 1000000.0, 1e-6,
                             tied=True, qk_norm=True, post_norms=True, sliding_window=512),
    # Mixtures of experts (HF configs: Qwen3-30B-A3B 30,532,122,624 parameters; Mixtral-8x7B-v0.1
    # 46,702,792,704; Qwen2-57B-A14B 57,408,658,944).
    "qwen3-30b-a3b": ArchShape("qwen3moe", 151936, 2048, 48, 32, 4, 128, 6144, 40960, 1000000.0, 1e-6,
                               tied=False, qk_norm=True, add_bos=False, n_expert=128, n_expert_used=8,
                               n_ff_exp=768),
    "mixtral-8x7b": ArchShape("llama", 32000, 4096, 32, 32, 8, 128, 14336, 32768, 1000000.0, 1e-5,
                              tied=False, n_expert=8, n_expert_used=2),
    "qwen2-57b-a14b": ArchShape("qwen2moe", 151936, 3584, 28, 28, 4, 128, 18944, 32768, 1000000.0, 1e-6,
                                tied=False, qkv_bias=True, add_bos=False, n_expert=64, n_expert_used=8,
                                n_ff_exp=2560, n_ff_shexp=20480),
    # Tiny ones for tests (the numpy model runs them in milliseconds; llama.cpp loads them too).
    "tiny-qwen3moe": ArchShape("qwen3moe", 512, 128, 2, 4, 2, 32, 192, 512, 1000000.0, 1e-6,
                               tied=False, qk_norm=True, add_bos=False, n_expert=8, n_expert_used=3,
                               n_ff_exp=64),
    "tiny-mixtral": ArchShape("llama", 512, 128, 2, 4, 2, 32, 96, 512, 1000000.0, 1e-5,
                              tied=False, n_expert=4, n_expert_used=2),
    "tiny-qwen2moe": ArchShape("qwen2moe", 512, 128, 2, 4, 2, 32, 192, 512, 1000000.0, 1e-6,
                               tied=False, qkv_bias=True, add_bos=False, n_expert=8, n_expert_used=2,
                               n_ff_exp=64, n_ff_shexp=128),
}

# llama.cpp's fallbacks when a row length is not a multiple of a K-quant's 256-value super-block.
K_FALLBACK = {GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0,
              GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1,
              GGMLType.Q6_K: GGMLType.Q8_0}
# general.file_type (llama_ftype) for a file whose matrices are all of one type.
FILE_TYPE = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3,
             GGMLType.Q8_0: 7, GGMLType.Q5_0: 8, GGMLType.Q5_1: 9, GGMLType.Q2_K: 10,
             GGMLType.Q3_K: 11, GGMLType.Q4_K: 14, GGMLType.Q5_K: 16, GGMLType.Q6_K: 18}


def with_overrides(shape: ArchShape, **kw) -> ArchShape:
    """A copy of `shape` with fields replaced (n_layers=2, n_embd=256, ...), checked for consistency."""
    names = {f.name for f in dataclasses.fields(ArchShape)}
    bad = set(kw) - names
    if bad:
        raise ValueError(f"unknown shape field(s) {sorted(bad)}; known: {sorted(names)}")
    s = dataclasses.replace(shape, **kw)
    for f in ("vocab", "n_embd", "n_layers", "n_head", "n_head_kv", "head_dim", "n_ff", "n_ctx"):
        if getattr(s, f) <= 0:
            raise ValueError(f"{f} must be positive, got {getattr(s, f)}")
    if s.n_head % s.n_head_kv:
        raise ValueError(f"n_head {s.n_head} is not a multiple of n_head_kv {s.n_head_kv}")
    if s.n_expert < 0 or not (0 < s.n_expert_used <= s.n_expert or s.n_expert == s.n_expert_used == 0):
        raise ValueError(f"n_expert_used {s.n_expert_used} must be in [1, n_expert {s.n_expert}]")
    if s.arch in ("qwen2moe", "qwen3moe") and not s.n_expert:
        raise ValueError(f"{s.arch} needs n_expert > 0")
    if (s.arch == "qwen2moe") != (s.n_ff_shexp > 0):
        raise ValueError("a shared expert (n_ff_shexp > 0) is qwen2moe's, and qwen2moe needs one")
    return s


def matrix_type(t: GGMLType, row: int) -> GGMLType:
    """`t`, or llama.cpp's fallback when `row` is not a whole number of t's blocks."""
    if row % BLOCK_GEOMETRY[t][0] == 0:
        return t
    fb = K_FALLBACK.get(t, GGMLType.F16)
    if row % BLOCK_GEOMETRY[fb][0]:
        return GGMLType.F16
    return fb


@dataclass(frozen=True)
class TensorPlan:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    mean: float  # of the values (1 for norm weights)
    std: float   # RMS of the values about the mean


def tensor_plan(s: ArchShape, qtype: GGMLType, embd_type: GGMLType | None = None,
                output_type: GGMLType | None = None, logit_std: float = 4.0,
                pick: Callable[[str], GGMLType] | None = None) -> list[TensorPlan]:
    """Every tensor of the model, in file order. Matrices get weight RMS 1/sqrt(in_features), so
    activations stay O(1) through any depth; the head gets logit_std/sqrt(E) so logits have RMS
    ~logit_std (a tied head shares token_embd, which then has that RMS too). pick: tensor name ->
    type, a quantization mix (mixes.py) instead of `qtype` everywhere; embd_type and output_type
    still override it."""
    E, D, F = s.n_embd, s.head_dim, s.n_ff
    q_out, kv_out = s.n_head * D, s.n_head_kv * D

    def mat(name, rows, cols, t=None, std=None):
        if t is None:
            t = pick(name) if pick else qtype
        return TensorPlan(name, matrix_type(t, cols), (rows, cols), 0.0,
                          std if std is not None else cols ** -0.5)

    def vec(name, n, mean=1.0, std=0.05):
        return TensorPlan(name, GGMLType.F32, (n,), mean, std)

    head_std = logit_std * E ** -0.5
    plan = [mat("token_embd.weight", s.vocab, E, embd_type, head_std if s.tied else 1.0),
            vec("output_norm.weight", E)]
    if not s.tied:
        plan.append(mat("output.weight", s.vocab, E, output_type, head_std))
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plan.append(vec(p + "attn_norm.weight", E))
        plan.append(mat(p + "attn_q.weight", q_out, E))
        plan.append(mat(p + "attn_k.weight", kv_out, E))
        plan.append(mat(p + "attn_v.weight", kv_out, E))
        if s.qkv_bias:
            plan += [vec(p + "attn_q.bias", q_out, 0.0, 0.1), vec(p + "attn_k.bias", kv_out, 0.0, 0.1),
                     vec(p + "attn_v.bias", kv_out, 0.0, 0.1)]
        if s.qk_norm:
            plan += [vec(p + "attn_q_norm.weight", D), vec(p + "attn_k_norm.weight", D)]
        plan.append(mat(p + "attn_output.weight", E, q_out))
        if s.post_norms:
            plan.append(vec(p + "post_attention_norm.weight", E))
        plan.append(vec(p + "ffn_norm.weight", E))
        if s.n_expert:
            plan += _moe_plan(s, p, mat)
        else:
            plan.append(mat(p + "ffn_gate.weight", F, E))
            plan.append(mat(p + "ffn_up.weight", F, E))
            plan.append(mat(p + "ffn_down.weight", E, F))
        if s.post_norms:
            plan.append(vec(p + "post_ffw_norm.weight", E))
    return plan


def _moe_plan(s: ArchShape, p: str, mat) -> list[TensorPlan]:
    """A MoE layer's router, stacked experts and (qwen2moe) shared expert; mat(name, rows, cols) plans
    a matrix, widened here to 3-D for the stacked experts (the type follows the row length)."""
    E, X, Fx, S = s.n_embd, s.n_expert, s.expert_width, s.n_ff_shexp

    def stacked(name, rows, cols):
        m = mat(name, rows, cols)
        return TensorPlan(m.name, m.ggml_type, (X, rows, cols), m.mean, m.std)

    out = [mat(p + "ffn_gate_inp.weight", X, E, GGMLType.F32),
           stacked(p + "ffn_gate_exps.weight", Fx, E), stacked(p + "ffn_up_exps.weight", Fx, E),
           stacked(p + "ffn_down_exps.weight", E, Fx)]
    if S:
        out += [mat(p + "ffn_gate_inp_shexp.weight", 1, E, GGMLType.F32),
                mat(p + "ffn_gate_shexp.weight", S, E), mat(p + "ffn_up_shexp.weight", S, E),
                mat(p + "ffn_down_shexp.weight", E, S)]
    return out


def model_metadata(s: ArchShape, qtype: GGMLType, name: str, file_type: int | None = None) -> dict:
    """general.* and <arch>.* keys (tokenizer keys come from vocab.py). file_type: general.file_type
    of a mix (default: the one of a file whose matrices are all `qtype`)."""
    a = s.arch
    md = {
        "general.architecture": a,
        "general.type": "model",
        "general.name": name,
        "general.file_type": FILE_TYPE.get(qtype, 0) if file_type is None else file_type,
        "general.quantization_version": 2,
        f"{a}.context_length": s.n_ctx,
        f"{a}.embedding_length": s.n_embd,
        f"{a}.block_count": s.n_layers,
        f"{a}.feed_forward_length": s.n_ff,
        f"{a}.attention.head_count": s.n_head,
        f"{a}.attention.head_count_kv": s.n_head_kv,
        f"{a}.rope.freq_base": float(s.rope_base),
        f"{a}.attention.layer_norm_rms_epsilon": float(s.rms_eps),
    }
    if s.n_expert:
        md[f"{a}.expert_count"] = s.n_expert
        md[f"{a}.expert_used_count"] = s.n_expert_used
        if s.n_ff_exp:   # Mixtral's experts are feed_forward_length wide: it has no such key
            md[f"{a}.expert_feed_forward_length"] = s.n_ff_exp
        if s.n_ff_shexp:
            md[f"{a}.expert_shared_feed_forward_length"] = s.n_ff_shexp
    if s.head_dim * s.n_head != s.n_embd or a in ("qwen3", "qwen3moe", "gemma3"):
        md[f"{a}.attention.key_length"] = s.head_dim
        md[f"{a}.attention.value_length"] = s.head_dim
    if a == "llama":
        md[f"{a}.vocab_size"] = s.vocab
        md[f"{a}.rope.dimension_count"] = s.head_dim
    if s.sliding_window:
        md[f"{a}.attention.sliding_window"] = s.sliding_window
    return md
