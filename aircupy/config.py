"""ModelConfig: everything a forward pass needs to know about a model, read once from GGUF metadata.

Keys follow llama.cpp's naming (`{arch}.embedding_length`, `{arch}.attention.head_count`, ...); where
llama.cpp hard-codes a per-architecture fact that the file does not carry (Gemma3's every-6th-layer
global attention and 10000 local rope base, Gemma3-27B's query scale), it is hard-coded here too, with
the reason beside it, so that our logits match llama.cpp's on the same file.

A GGUF file is untrusted: every value is checked before anything is sized from it. Sizes are checked
against the tensors the file holds (block_count against the blk.N tensors, embedding and head sizes
against token_embd and each layer's matrices, the vocabulary against token_embd's rows), numbers for
being finite and in range (a NaN rope base or a negative epsilon would be served as garbage), so that a
hostile header is one UnsupportedModelError naming the key rather than a MemoryError or a model
that answers noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from aircupy.errors import UnsupportedModelError
from aircupy.gguf.arch import MOE_ARCHS

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe")

# Context reserved when the user names none: the model's own, capped so that a 128k-context model does
# not reserve a 128k-token KV cache (and, on the numpy backend, 128k x n_ctx attention scores) by default.
DEFAULT_N_CTX_CAP = 4096

MAX_CONTEXT = 2**31 - 1   # positions are int32 on every backend

# Rotation convention per architecture (llama.cpp's LLAMA_ROPE_TYPE_NORM vs _NEOX). llama GGUFs store
# Q/K rows permuted so that adjacent pairs (2i, 2i+1) rotate together; the others keep HF's half split.
_ROPE_TYPE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "gemma3": "neox", "qwen2moe": "neox",
              "qwen3moe": "neox"}

# Mixture of experts. llama.cpp allows at most LLAMA_MAX_EXPERTS routed experts per layer.
MAX_EXPERTS = 1024
# Whether the top-k router weights are renormalised to sum 1 (build_moe_ffn's norm_w). llama.cpp
# hard-codes it per architecture in the graph (src/models/llama.cpp, qwen2moe.cpp, qwen3moe.cpp) and
# reads neither {arch}.expert_weights_norm nor {arch}.expert_weights_scale for these three, so neither
# do we: the same file must give the same logits. Mixtral (llama) and Qwen3-MoE renormalise (HF's
# Mixtral softmaxes the top-k logits, the same numbers; Qwen3's norm_topk_prob is true), Qwen2-MoE
# does not (norm_topk_prob false).
_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen3moe": True, "qwen2moe": False}


@dataclass(frozen=True)
class RopeScaling:
    """Rope frequency scaling as llama.cpp applies it (the ggml_rope_ext parameters).

    kind: "none" | "linear" | "yarn". llama3-style scaling has no metadata of its own: the converter
    bakes it into the `rope_freqs.weight` tensor (per-frequency divisors), which the model loads.
    factor: context extension factor (positions are divided by it for "linear"; freq_scale = 1/factor).
    """
    kind: str = "none"
    factor: float = 1.0
    orig_ctx: int = 0
    attn_factor: float = 1.0
    yarn_ext_factor: float = 0.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    @property
    def freq_scale(self) -> float:
        return 1.0 if self.kind == "none" else 1.0 / self.factor


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int            # key/query head size
    head_dim_v: int          # value head size (== head_dim for every supported arch so far)
    vocab_size: int
    n_ctx_train: int
    rope_base: float         # base of global-attention layers
    rope_base_local: float   # base of sliding-window layers (== rope_base unless the arch differs)
    rope_type: str           # "norm" (adjacent pairs, llama) | "neox" (half split)
    rope_dim: int            # leading dims of each head that rotate (== head_dim unless partial)
    rope_scaling: RopeScaling          # applies to global layers
    rope_scaling_local: RopeScaling    # applies to sliding-window layers
    rms_eps: float
    sliding_window: int | None         # keys with q_pos - k_pos >= window are masked on SWA layers
    swa_layers: tuple[bool, ...]       # per layer: True = sliding-window attention
    tied_output: bool                  # output head is token_embd (no output.weight)
    embed_scale: float                 # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    attn_scale: float                  # scores = q.k * attn_scale
    qk_norm: bool                      # RMSNorm on each q/k head before rope (qwen3, gemma3)
    attn_bias: bool                    # q/k/v projections carry biases (qwen2)
    post_norms: bool                   # gemma's extra norms after attention and after the FFN
    activation: str                    # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    attn_softcap: float | None
    final_softcap: float | None
    bos_id: int | None
    eos_ids: tuple[int, ...]           # eos / eot / eom ids named in metadata (tokenizer adds more EOGs)
    # Mixture of experts (0 experts: a dense FFN of n_ff). Each MoE layer routes every token to
    # n_expert_used of n_expert experts, each a SwiGLU FFN of width n_ff_exp (reference/moe.py has the
    # router); qwen2moe adds a shared expert of width n_ff_shexp that every token uses.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0                # 0: no shared expert
    expert_weights_norm: bool = False  # renormalise the top-k router weights to sum 1

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def default_n_ctx(self) -> int:
        """min(the training context, DEFAULT_N_CTX_CAP): the context used when none is asked for."""
        return min(self.n_ctx_train, DEFAULT_N_CTX_CAP)

    def kv_cache_bytes(self, n_ctx: int, bytes_per_value: int) -> int:
        """Bytes of a K and V cache of n_ctx positions over every layer."""
        return self.n_layers * n_ctx * self.n_head_kv * (self.head_dim + self.head_dim_v) * bytes_per_value

    @property
    def n_rep(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.n_head // self.n_head_kv

    def layer_window(self, layer: int) -> int | None:
        return self.sliding_window if self.swa_layers[layer] else None

    @classmethod
    def from_gguf(cls, g) -> "ModelConfig":
        """Build from a GGUFFile (anything with .metadata, .get(key, default) and .tensors)."""
        arch = g.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        md = _Meta(g, arch)

        n_layers = md.int("block_count")
        _check_blocks(g, arch, n_layers)
        moe = _experts(md, arch, n_layers)
        n_embd = md.int("embedding_length")
        n_head = md.uniform_int("attention.head_count", n_layers)
        n_head_kv = md.uniform_int("attention.head_count_kv", n_layers, default=n_head)
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise UnsupportedModelError(f"{arch}: {n_head} query heads cannot be grouped over {n_head_kv} kv heads")
        head_dim = md.int("attention.key_length", default=n_embd // n_head)
        head_dim_v = md.int("attention.value_length", default=head_dim)
        rope_dim = md.int("rope.dimension_count", default=head_dim)
        if rope_dim < 2 or rope_dim > head_dim or rope_dim % 2:
            raise UnsupportedModelError(f"{arch}: rope dimension {rope_dim} does not fit head size {head_dim}")

        if "token_embd.weight" not in g.tensors:
            raise UnsupportedModelError(f"{arch}: missing tensor 'token_embd.weight'")
        embd_shape = tuple(g.tensors["token_embd.weight"].shape)  # numpy order: (vocab, n_embd)
        if len(embd_shape) != 2 or embd_shape[1] != n_embd:
            raise UnsupportedModelError(f"{arch}: token_embd.weight has shape {embd_shape}, but "
                                        f"{arch}.embedding_length is {n_embd}")
        vocab_size = int(embd_shape[0])
        tokens = g.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens) != vocab_size:
            raise UnsupportedModelError(f"{arch}: the vocabulary has {len(tokens)} tokens but token_embd.weight "
                                        f"has {vocab_size} rows")
        tied = "output.weight" not in g.tensors

        rope_base = md.float("rope.freq_base", default=10000.0)
        scaling = _rope_scaling(md)
        window = md.int("attention.sliding_window", default=0) or None
        is_gemma = arch == "gemma3"
        swa_layers = _swa_layers(md, arch, n_layers, window)
        if is_gemma and window is not None:
            # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): local layers use base 10000 and no scaling,
            # whatever the global layers use; the file carries neither fact unless freq_base_swa is set.
            rope_base_local = md.float("rope.freq_base_swa", default=10000.0)
            scaling_local = RopeScaling()
        else:
            rope_base_local = md.float("rope.freq_base_swa", default=rope_base)
            scaling_local = scaling

        if is_gemma and n_layers == 62:
            # Gemma3-27B uses query_pre_attn_scalar = n_embd / n_head instead of head_dim; llama.cpp
            # keys this on the model size too since the GGUF does not store it.
            attn_scale = 1.0 / math.sqrt(n_embd / n_head)
        else:
            attn_scale = 1.0 / math.sqrt(head_dim)

        eos_ids = tuple(dict.fromkeys(
            _token_id(g, k, vocab_size) for k in ("eos_token_id", "eot_token_id", "eom_token_id")
            if g.get(f"tokenizer.ggml.{k}") is not None))
        bos = g.get("tokenizer.ggml.bos_token_id")
        if bos is not None:
            bos = _token_id(g, "bos_token_id", vocab_size)
        config = cls(
            arch=arch, n_layers=n_layers, n_embd=n_embd, n_ff=moe.pop("n_ff"),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            vocab_size=vocab_size, n_ctx_train=md.int("context_length", default=2048),
            rope_base=rope_base, rope_base_local=rope_base_local, rope_type=_ROPE_TYPE[arch],
            rope_dim=rope_dim, rope_scaling=scaling, rope_scaling_local=scaling_local,
            rms_eps=md.float("attention.layer_norm_rms_epsilon", default=1e-5),
            sliding_window=window, swa_layers=swa_layers, tied_output=tied,
            embed_scale=math.sqrt(n_embd) if is_gemma else 1.0, attn_scale=attn_scale,
            qk_norm=arch in ("qwen3", "qwen3moe", "gemma3"), attn_bias=arch in ("qwen2", "qwen2moe"),
            post_norms=is_gemma,
            activation="gelu_tanh" if is_gemma else "silu",
            attn_softcap=md.float("attn_logit_softcapping", default=0.0) or None,
            final_softcap=md.float("final_logit_softcapping", default=0.0) or None,
            bos_id=bos, eos_ids=eos_ids, **moe,
        )
        _check_values(config, g)
        return config


class _Meta:
    """Typed access to `{arch}.*` metadata with errors that name the key."""

    def __init__(self, g, arch: str):
        self.g, self.arch = g, arch

    def raw(self, key: str, default: Any = None) -> Any:
        return self.g.get(f"{self.arch}.{key}", default)

    def int(self, key: str, default: int | None = None) -> int:
        v = self.raw(key, default)
        if v is None:
            raise UnsupportedModelError(f"{self.arch}: metadata key '{self.arch}.{key}' is missing")
        if isinstance(v, (bool, str)) or np.ndim(v) != 0:
            raise UnsupportedModelError(f"{self.arch}: metadata '{self.arch}.{key}' is not an integer: {v!r}")
        return int(v)

    def uniform_int(self, key: str, n_layers: int, default: int | None = None) -> int:
        """A per-layer size stored either as a scalar or as an array; only uniform arrays are supported."""
        v = self.raw(key, default)
        if v is not None and np.ndim(v) == 1:
            vals = set(int(x) for x in np.asarray(v).tolist())
            if len(v) != n_layers or len(vals) != 1:
                raise UnsupportedModelError(f"{self.arch}: per-layer '{self.arch}.{key}' varies; not supported")
            return vals.pop()
        return self.int(key, default)

    def float(self, key: str, default: float | None = None) -> float:
        v = self.raw(key, default)
        if v is None:
            raise UnsupportedModelError(f"{self.arch}: metadata key '{self.arch}.{key}' is missing")
        if isinstance(v, (bool, str)) or np.ndim(v) != 0:
            raise UnsupportedModelError(f"{self.arch}: metadata '{self.arch}.{key}' is not a number: {v!r}")
        return float(v)


def _experts(md: _Meta, arch: str, n_layers: int) -> dict:
    """n_ff and the expert fields of ModelConfig, read as llama.cpp reads them (llama_model::load_hparams
    and the per-architecture load_arch_hparams / load_arch_tensors):
        {arch}.expert_count            routed experts (0 or absent: dense; qwen*moe require > 0)
        {arch}.expert_used_count       top-k, 1..expert_count (a per-layer array must be uniform)
        {arch}.expert_feed_forward_length         qwen*moe expert width; absent: n_ff / expert_used_count.
                                       Mixtral-style llama has no such key: its experts are n_ff wide.
        {arch}.expert_shared_feed_forward_length  qwen2moe shared-expert width; absent: n_ff
    feed_forward_length is optional for qwen*moe (0 when absent) and required otherwise."""
    n_expert = md.int("expert_count", default=0)
    if arch in MOE_ARCHS or n_expert:
        n_ff = md.uniform_int("feed_forward_length", n_layers, default=0)
    else:
        return {"n_ff": md.uniform_int("feed_forward_length", n_layers)}
    if arch not in _EXPERT_WEIGHTS_NORM:
        raise UnsupportedModelError(f"{arch}: mixture-of-experts layers ({arch}.expert_count = {n_expert}) "
                                    f"are not supported for this architecture")
    if not 0 < n_expert <= MAX_EXPERTS:
        raise UnsupportedModelError(f"{arch}: {arch}.expert_count {n_expert} is not in [1, {MAX_EXPERTS}]")
    used = md.uniform_int("expert_used_count", n_layers, default=0)
    if not 0 < used <= n_expert:
        raise UnsupportedModelError(f"{arch}: {arch}.expert_used_count {used} is not in [1, {n_expert}]")
    if arch == "llama":
        n_ff_exp = n_ff
    else:
        n_ff_exp = md.uniform_int("expert_feed_forward_length", n_layers, default=0) or n_ff // used
    n_ff_shexp = (md.int("expert_shared_feed_forward_length", default=0) or n_ff) if arch == "qwen2moe" else 0
    if n_ff_exp <= 0 or n_ff_shexp < 0 or (arch == "qwen2moe" and n_ff_shexp == 0):
        raise UnsupportedModelError(f"{arch}: expert widths {n_ff_exp} (routed) / {n_ff_shexp} (shared) must be "
                                    f"positive: set {arch}.expert_feed_forward_length or feed_forward_length")
    return {"n_ff": n_ff, "n_expert": n_expert, "n_expert_used": used, "n_ff_exp": n_ff_exp,
            "n_ff_shexp": n_ff_shexp, "expert_weights_norm": _EXPERT_WEIGHTS_NORM[arch]}


def _token_id(g, key: str, vocab_size: int) -> int:
    v = g.get(f"tokenizer.ggml.{key}")
    if isinstance(v, (bool, str)) or np.ndim(v) != 0 or not 0 <= int(v) < vocab_size:
        raise UnsupportedModelError(f"tokenizer.ggml.{key} {v!r} is not a token id of the {vocab_size}-token vocabulary")
    return int(v)


def _check_blocks(g, arch: str, n_layers: int) -> None:
    """block_count must name blocks the file holds: every blk.{i} for i < block_count has tensors
    (so nothing is sized per layer from a number the file does not back)."""
    present = set()
    for name in g.tensors:
        head, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        if head == "blk" and index.isdigit():
            present.add(int(index))
    if n_layers < 1 or n_layers > len(present) or any(i not in present for i in range(n_layers)):
        raise UnsupportedModelError(f"{arch}: {arch}.block_count is {n_layers} but the file holds tensors for "
                                    f"{len(present)} blocks")


def _expect(g, name: str, shape: tuple, what: str) -> None:
    t = g.tensors.get(name)
    if t is None:
        raise UnsupportedModelError(f"missing tensor {name!r}")
    if tuple(t.shape) != shape:
        raise UnsupportedModelError(f"{name} has shape {tuple(t.shape)}, but the metadata ({what}) says {shape}")


def _finite(arch: str, key: str, v: float, lo: float, hi: float = math.inf, lo_open: bool = True) -> None:
    if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v < hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi})"
        raise UnsupportedModelError(f"{arch}: metadata {key} = {v!r} is not a finite number in {rng}")


def _check_values(c: "ModelConfig", g) -> None:
    """Ranges of the scalar settings, and each layer's matrices against the sizes the metadata gives."""
    a = c.arch
    if not 1 <= c.n_ctx_train <= MAX_CONTEXT:
        raise UnsupportedModelError(f"{a}: {a}.context_length {c.n_ctx_train} is not in [1, {MAX_CONTEXT}]")
    if c.head_dim < 1 or c.head_dim_v < 1:
        raise UnsupportedModelError(f"{a}: head sizes {c.head_dim}/{c.head_dim_v} must be positive")
    if c.sliding_window is not None and c.sliding_window < 0:
        raise UnsupportedModelError(f"{a}: {a}.attention.sliding_window {c.sliding_window} is negative")
    _finite(a, "rope.freq_base", c.rope_base, 0.0)
    _finite(a, "rope.freq_base_swa", c.rope_base_local, 0.0)
    _finite(a, "attention.layer_norm_rms_epsilon", c.rms_eps, 0.0, 1.0)
    for s in (c.rope_scaling, c.rope_scaling_local):
        _finite(a, "rope.scaling.factor", s.factor, 0.0)
        _finite(a, "rope.scaling.attn_factor", s.attn_factor, 0.0)
        for key, v in (("yarn_ext_factor", s.yarn_ext_factor), ("yarn_beta_fast", s.yarn_beta_fast),
                       ("yarn_beta_slow", s.yarn_beta_slow)):
            _finite(a, f"rope.scaling.{key}", v, -math.inf)
        if s.orig_ctx < 0:
            raise UnsupportedModelError(f"{a}: rope.scaling.original_context_length {s.orig_ctx} is negative")
    for key, v in (("attn_logit_softcapping", c.attn_softcap), ("final_logit_softcapping", c.final_softcap)):
        if v is not None:
            _finite(a, key, v, 0.0)
    q, kv, ff, e = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_ff, c.n_embd
    v_rows, o_cols = c.n_head_kv * c.head_dim_v, c.n_head * c.head_dim_v
    heads = f"{c.n_head} heads x {c.head_dim}, {c.n_head_kv} kv heads, embedding {e}"
    for i in range(c.n_layers):
        b = f"blk.{i}."
        _expect(g, b + "attn_q.weight", (q, e), heads)
        _expect(g, b + "attn_k.weight", (kv, e), heads)
        _expect(g, b + "attn_v.weight", (v_rows, e), heads)
        _expect(g, b + "attn_output.weight", (e, o_cols), heads)
        if c.is_moe:
            _check_moe_layer(c, g, b)
            continue
        for role in ("ffn_gate", "ffn_up"):
            _expect(g, b + role + ".weight", (ff, e), f"feed_forward_length {ff}")
        _expect(g, b + "ffn_down.weight", (e, ff), f"feed_forward_length {ff}")


def _check_moe_layer(c: ModelConfig, g, b: str) -> None:
    """A MoE layer's router and expert tensors against the expert metadata (numpy shapes)."""
    X, F, e = c.n_expert, c.n_ff_exp, c.n_embd
    what = f"expert_count {X}, expert width {F}, embedding {e}"
    _expect(g, b + "ffn_gate_inp.weight", (X, e), what)
    _expect(g, b + "ffn_gate_exps.weight", (X, F, e), what)
    _expect(g, b + "ffn_up_exps.weight", (X, F, e), what)
    _expect(g, b + "ffn_down_exps.weight", (X, e, F), what)
    if c.n_ff_shexp:
        S = c.n_ff_shexp
        gate = g.tensors.get(b + "ffn_gate_inp_shexp.weight")
        # The converter writes HF's (1, E) Linear weight as is; llama.cpp's loader also takes (E,).
        if gate is None or tuple(gate.shape) not in ((e,), (1, e)):
            _expect(g, b + "ffn_gate_inp_shexp.weight", (e,), f"embedding {e}")
        _expect(g, b + "ffn_gate_shexp.weight", (S, e), f"shared expert width {S}")
        _expect(g, b + "ffn_up_shexp.weight", (S, e), f"shared expert width {S}")
        _expect(g, b + "ffn_down_shexp.weight", (e, S), f"shared expert width {S}")


def _rope_scaling(md: _Meta) -> RopeScaling:
    kind = md.raw("rope.scaling.type")
    factor = md.raw("rope.scaling.factor")
    if kind is None:
        legacy = md.raw("rope.scale_linear")  # older converters wrote only this key
        if legacy is not None and float(legacy) != 1.0:
            return RopeScaling(kind="linear", factor=float(legacy))
        return RopeScaling()
    kind = str(kind)
    factor = float(factor) if factor else 1.0  # llama.cpp treats a factor of 0 as "not set"
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling()
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"{md.arch}: rope scaling type {kind!r} is not supported (linear, yarn)")
    orig = md.int("rope.scaling.original_context_length", default=md.int("context_length", default=2048))
    if kind == "linear":
        return RopeScaling(kind="linear", factor=factor, orig_ctx=orig)
    # llama.cpp: yarn ext_factor defaults to 1 when the file says yarn; attn_factor defaults to 1 and
    # the mscale 1 + 0.1 ln(factor) is applied inside the rope itself.
    return RopeScaling(
        kind="yarn", factor=factor, orig_ctx=orig,
        attn_factor=md.float("rope.scaling.attn_factor", default=1.0),
        yarn_ext_factor=md.float("rope.scaling.yarn_ext_factor", default=1.0),
        yarn_beta_fast=md.float("rope.scaling.yarn_beta_fast", default=32.0),
        yarn_beta_slow=md.float("rope.scaling.yarn_beta_slow", default=1.0),
    )


def _swa_layers(md: _Meta, arch: str, n_layers: int, window: int | None) -> tuple[bool, ...]:
    """Which layers attend through the sliding window. A pattern n means layer i is local unless
    i % n == n - 1 (llama.cpp's set_swa_pattern); a bool array names each layer directly."""
    if window is None:
        return (False,) * n_layers
    pattern = md.raw("attention.sliding_window_pattern")
    if pattern is None:
        # Gemma3: llama.cpp hard-codes a pattern of 6 (five local layers, then one global).
        pattern = 6 if arch == "gemma3" else 0
    if np.ndim(pattern) == 1:
        flags = tuple(bool(x) for x in np.asarray(pattern).tolist())
        if len(flags) != n_layers:
            raise UnsupportedModelError(f"{arch}: sliding_window_pattern has {len(flags)} entries for {n_layers} layers")
        return flags
    n = int(pattern)
    if n < 0:
        raise UnsupportedModelError(f"{arch}: sliding_window_pattern {n} is negative")
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layers))
