"""NumpyModel: the float32 reference forward pass for llama, qwen2, qwen3, gemma3 and the mixtures of
experts qwen2moe, qwen3moe and Mixtral-style llama.

Weights are dequantized once at load into contiguous float32 matrices in GGUF's (out, in) numpy order,
so each projection is `x @ W.T` (BLAS reads W.T as a Fortran-order matrix: no copy). Q/K/V are fused
into one (Hq*D + 2*Hkv*D, E) matrix and gate/up into one (2*F, E) matrix: one matmul each per layer.

Per layer (pre-norm residual; gemma3 adds the bracketed post-norms):
    h = rms_norm(x); q, k, v = h @ Wqkv.T (+ b); [qk_norm per head]; rope(q, k)
    x += [post_norm](attention(q, cache k/v) @ Wo.T)
    x += [post_norm](act(h2 @ Wgate.T) * (h2 @ Wup.T) @ Wdown.T), h2 = rms_norm(x)
logits = rms_norm(x) @ Wout.T (Wout = token_embd when the head is tied).
In a mixture-of-experts layer the FFN line is x += moe_ffn(h2): a router picks n_expert_used experts
per row and sums their SwiGLU FFNs, weighted (reference/moe.py has the formula and llama.cpp's order).

Two entry points run that one layer formula (_layers/_layer/_head); they differ only in attend(), where
K/V are stored and how attention reads them:
    forward(ids (T,), positions (T,), cache)     one sequence, its contiguous KVCache (kv_cache.py)
    forward_step(Step.arrays(), pool)            a continuous-batching step: every sequence's chunk as
                                                 one batch of N rows, K/V in a PagedKVCache (batch.py)
Both take skip_layers: layers not run at all (x passes through unchanged, their K/V never written), the
self-draft of speculative decoding; draft_view(skip_layers) packages that as a Model of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aircupy.config import ModelConfig
from aircupy.errors import InvalidParameterError, UnsupportedModelError
from aircupy.gguf.quants import dequantize
from aircupy.gguf.arch import TensorMap, tensor_map
from aircupy.reference.batch import StepArrays
from aircupy.reference.kv_cache import KVCache
from aircupy.reference.moe import MoeWeights, moe_ffn
from aircupy.reference.paged_kv import PagedKVCache
from aircupy.reference import ops as ref

# Tokens per KV block of the paged pool (kv_spec): small enough that a prompt wastes little of its
# last block, large enough that gathering a sequence's keys is a few whole-block copies.
KV_BLOCK_SIZE = 16


@dataclass
class _Layer:
    attn_norm: np.ndarray            # (E,)
    wqkv: np.ndarray                 # (Hq*D + 2*Hkv*D, E)
    bqkv: np.ndarray | None          # (Hq*D + 2*Hkv*D,)
    q_norm: np.ndarray | None        # (D,)
    k_norm: np.ndarray | None        # (D,)
    wo: np.ndarray                   # (E, Hq*Dv)
    bo: np.ndarray | None            # (E,)
    post_attn_norm: np.ndarray | None
    ffn_norm: np.ndarray             # (E,)
    w_gate_up: np.ndarray | None     # (2F, E): rows [0, F) gate, [F, 2F) up; None in a MoE layer
    w_down: np.ndarray | None        # (E, F)
    post_ffn_norm: np.ndarray | None
    moe: MoeWeights | None = None    # the router and experts of a MoE layer


class NumpyModel:
    """model = NumpyModel(g, config); cache = model.new_cache(n_ctx);
    logits = model.forward(token_ids (T,), positions (T,), cache, all_logits=False).
    Implements the engine's Model protocol (engine/model.py); sampling happens on the host."""

    def __init__(self, g, config: ModelConfig):
        self.config = config
        self.tensor_map: TensorMap = tensor_map(config.arch, config.n_layers, g.tensors, experts=config.is_moe)
        self._g = g
        c = config
        qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        vd = c.n_head_kv * c.head_dim_v
        tm = self.tensor_map

        self.output_norm = self._load(tm.globals["output_norm"], (c.n_embd,))
        # The head is used every step; when tied it doubles as the embedding table (same values as
        # dequantizing the rows on demand, since dequantization is exact and deterministic).
        self.output = self._load(tm.output_name(), (c.vocab_size, c.n_embd))
        self._embd_info = g.tensors[tm.globals["token_embd"]]
        self.rope_freqs = (self._load(tm.globals["rope_freqs"], (c.rope_dim // 2,))
                           if "rope_freqs" in tm.globals else None)

        self.layers: list[_Layer] = []
        for i, names in enumerate(tm.layers):
            def w(role, shape, names=names):
                return self._load(names[role], shape) if role in names else None

            wq, wk, wv = w("attn_q", (qd, c.n_embd)), w("attn_k", (kvd, c.n_embd)), w("attn_v", (vd, c.n_embd))
            biases = [w("attn_q_bias", (qd,)), w("attn_k_bias", (kvd,)), w("attn_v_bias", (vd,))]
            if any(b is not None for b in biases):
                sizes = (qd, kvd, vd)
                bqkv = np.concatenate([b if b is not None else np.zeros(n, np.float32) for b, n in zip(biases, sizes)])
            else:
                bqkv = None
            self.layers.append(_Layer(
                attn_norm=w("attn_norm", (c.n_embd,)),
                wqkv=np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0)), bqkv=bqkv,
                q_norm=w("attn_q_norm", (c.head_dim,)), k_norm=w("attn_k_norm", (c.head_dim,)),
                wo=w("attn_output", (c.n_embd, c.n_head * c.head_dim_v)), bo=w("attn_output_bias", (c.n_embd,)),
                post_attn_norm=w("post_attention_norm", (c.n_embd,)),
                ffn_norm=w("ffn_norm", (c.n_embd,)),
                w_gate_up=None if c.is_moe else np.ascontiguousarray(np.concatenate(
                    [w("ffn_gate", (c.n_ff, c.n_embd)), w("ffn_up", (c.n_ff, c.n_embd))], axis=0)),
                w_down=None if c.is_moe else w("ffn_down", (c.n_embd, c.n_ff)),
                post_ffn_norm=w("post_ffw_norm", (c.n_embd,)),
                moe=self._load_moe(names) if c.is_moe else None,
            ))

    def _load_moe(self, names: dict[str, str]) -> MoeWeights:
        """A MoE layer's router and experts; gate and up stacked per expert, (X, 2F, E)."""
        c = self.config
        X, F, E, S = c.n_expert, c.n_ff_exp, c.n_embd, c.n_ff_shexp
        gate_up = np.concatenate([self._load(names["ffn_gate_exps"], (X, F, E)),
                                  self._load(names["ffn_up_exps"], (X, F, E))], axis=1)
        m = MoeWeights(router=self._load(names["ffn_gate_inp"], (X, E)), gate_up=np.ascontiguousarray(gate_up),
                       down=self._load(names["ffn_down_exps"], (X, E, F)), n_used=c.n_expert_used,
                       norm=c.expert_weights_norm)
        if S:
            gate = names["ffn_gate_inp_shexp"]   # (E,) or, as the converter writes it, (1, E)
            m.shexp_gate = self._load(gate, tuple(self._g.tensors[gate].shape)).reshape(E)
            m.shexp_gate_up = np.ascontiguousarray(np.concatenate(
                [self._load(names["ffn_gate_shexp"], (S, E)), self._load(names["ffn_up_shexp"], (S, E))], axis=0))
            m.shexp_down = self._load(names["ffn_down_shexp"], (E, S))
        return m

    def _load(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Dequantize one tensor to contiguous float32 after checking its shape against the config."""
        info = self._g.tensors[name]
        if tuple(info.shape) != tuple(shape):
            raise UnsupportedModelError(
                f"{self.config.arch}: tensor {name!r} has shape {tuple(info.shape)}, expected {tuple(shape)}")
        return np.ascontiguousarray(dequantize(info.data, info.ggml_type, info.shape), dtype=np.float32)

    # -- public interface -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, n_ctx: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, n_ctx, c.n_head_kv, c.head_dim, c.head_dim_v)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(T,) ids -> (T, E) scaled embeddings."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise InvalidParameterError("token_ids", f"token id out of range [0, {self.config.vocab_size})")
        if self.config.tied_output:
            x = self.output[ids]
        else:
            e = self._embd_info
            x = ref.embedding(e.data, e.ggml_type, e.shape, ids)
        if self.config.embed_scale != 1.0:
            x = x * np.float32(self.config.embed_scale)
        return x.astype(np.float32, copy=False)

    def forward(self, token_ids: np.ndarray, positions: np.ndarray, cache: KVCache,
                all_logits: bool = False, skip_layers=()) -> np.ndarray:
        """Run T new tokens (prefill T > 1 or decode T = 1) after what `cache` holds, store their keys
        and values, and return logits (T, vocab) if all_logits else (1, vocab) for the last token."""
        c = self.config
        token_ids = np.asarray(token_ids).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        T = token_ids.shape[0]
        if T == 0 or positions.shape[0] != T:
            raise InvalidParameterError("token_ids", f"need T >= 1 ids with T positions, got {T} and {positions.shape[0]}")
        cache.check_room(T)
        k_pos = cache.key_positions(positions)

        def attend(i, q, k, v):  # one sequence: its contiguous cache, every row's keys at once
            keys, values = cache.write(i, k, v)  # (Hkv, S, D), (Hkv, S, Dv)
            return ref.attention(q, keys, values, positions, k_pos, c.attn_scale,
                                 window=c.layer_window(i), softcap_value=c.attn_softcap)

        x = self._layers(self.embed(token_ids), positions, attend, skip_layers)
        cache.commit(positions)
        return self._head(x if all_logits else x[-1:])

    def kv_spec(self) -> dict:
        """Blocks of 16 tokens; the engine sizes the pool (host RAM) and the batch (no limit here)."""
        return dict(block_size=KV_BLOCK_SIZE, num_blocks=None, max_num_seqs=None)

    def new_kv_pool(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """The paged KV pool forward_step() reads and writes (slots as engine/blocks.py numbers them)."""
        c = self.config
        return PagedKVCache(c.n_layers, num_blocks, block_size, c.n_head_kv, c.head_dim, c.head_dim_v)

    def kv_blocks_for_budget(self, budget_bytes: int, block_size: int) -> int:
        """How many KV blocks of block_size tokens fit in budget_bytes (float32 K and V, every layer)."""
        c = self.config
        return PagedKVCache.blocks_for_budget(budget_bytes, c.n_layers, block_size, c.n_head_kv,
                                              c.head_dim, c.head_dim_v)

    def forward_step(self, arrays: dict, kv: PagedKVCache, skip_layers=()) -> np.ndarray:
        """Run one scheduler step (Step.arrays(): every running sequence's chunk at once, N rows) and
        return the float32 logits (R, vocab) of its logits_rows, in that order; only those R rows go
        through the head. Every row's K/V is written to `kv` at its slot_mapping slot. Shapes and the
        attention rules: reference/batch.py."""
        c = self.config
        if (kv.n_layers, kv.n_head_kv, kv.head_dim, kv.head_dim_v) != (c.n_layers, c.n_head_kv, c.head_dim, c.head_dim_v):
            raise InvalidParameterError("kv", f"{kv!r} is not this model's pool (new_kv_pool makes one)")
        step = StepArrays.check(arrays, kv, c.vocab_size)
        x = self._layers(self.embed(step.input_ids), step.positions, step.attend_fn(c, kv), skip_layers)
        return self._head(x[step.logits_rows])

    def forward_step_sample(self, arrays: dict, kv: PagedKVCache, samplers) -> tuple[np.ndarray, np.ndarray]:
        """forward_step for the engine's runner: every row comes back as logits for the host sampler
        (ids all -1), since new_sampler() never gives a device sampler here."""
        if any(s is not None for s in samplers):
            raise InvalidParameterError("samplers", "the numpy backend has no model-side sampler: pass None "
                                                    "for every row and sample the logits on the host")
        logits = self.forward_step(arrays, kv)
        if len(samplers) != len(logits):
            raise InvalidParameterError("samplers", f"need one per logits row ({len(logits)}), got {len(samplers)}")
        return np.full(len(logits), -1, np.int32), logits

    def draft_view(self, skip_layers) -> LayerSkipView:
        """This model with skip_layers skipped, as a Model of its own (new_cache, forward, forward_step):
        the self-draft of speculative decoding (engine/drafters.py). Shares the weights; its caches
        are its own."""
        return LayerSkipView(self, skip_layers)

    def _layers(self, x: np.ndarray, positions: np.ndarray, attend, skip_layers=()) -> np.ndarray:
        """Every layer over x (T, E) at `positions` (T,), but those in skip_layers; attend(i, q, k, v)
        stores layer i's k/v and returns the attention output (T, Hq*Dv)."""
        c = self.config
        ropes = {}  # (base, scaling) -> (cos, sin): local and global layers may differ
        for i, L in enumerate(self.layers):
            if i in skip_layers:
                continue
            key = (c.rope_base_local, c.rope_scaling_local) if c.swa_layers[i] else (c.rope_base, c.rope_scaling)
            if key not in ropes:
                ropes[key] = ref.rope_angles(positions, c.rope_dim, key[0], key[1], self.rope_freqs)
            x = self._layer(i, L, x, ropes[key], attend)
        return x

    def _head(self, x: np.ndarray) -> np.ndarray:
        """(R, E) final hidden states -> (R, vocab) logits."""
        c = self.config
        logits = ref.linear(ref.rms_norm(x, self.output_norm, c.rms_eps), self.output)
        if c.final_softcap:
            logits = ref.softcap(logits, c.final_softcap)
        return np.ascontiguousarray(logits)

    def new_sampler(self, params) -> None:
        """The numpy backend samples on the host from the logits (engine/sampler.py)."""
        return None

    def forward_sample(self, token_ids, positions, cache: KVCache, sampler) -> int:
        raise InvalidParameterError("sampler", "the numpy backend has no model-side sampler: "
                                               "sample forward()'s logits on the host")

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def _layer(self, i, L: _Layer, x, rope, attend) -> np.ndarray:
        """Layer i on x (T, E), the formula of the module docstring; where k/v live and how attention
        reads them is attend's business (one sequence's cache, or a step's paged pool)."""
        c = self.config
        T = x.shape[0]
        D, Dv = c.head_dim, c.head_dim_v
        qd, kvd = c.n_head * D, c.n_head_kv * D

        h = ref.rms_norm(x, L.attn_norm, c.rms_eps)
        qkv = ref.linear(h, L.wqkv, L.bqkv)  # (T, qd + kvd + vd)
        q = qkv[:, :qd].reshape(T, c.n_head, D)
        k = qkv[:, qd:qd + kvd].reshape(T, c.n_head_kv, D)
        v = qkv[:, qd + kvd:].reshape(T, c.n_head_kv, Dv)
        if L.q_norm is not None:
            q = ref.rms_norm(q, L.q_norm, c.rms_eps)
            k = ref.rms_norm(k, L.k_norm, c.rms_eps)
        cos, sin = rope
        q = ref.apply_rope(q, cos, sin, c.rope_type)
        k = ref.apply_rope(k, cos, sin, c.rope_type)

        a = attend(i, q, k, v)  # (T, Hq*Dv)
        o = ref.linear(a, L.wo, L.bo)
        if L.post_attn_norm is not None:
            o = ref.rms_norm(o, L.post_attn_norm, c.rms_eps)
        x = x + o

        h = ref.rms_norm(x, L.ffn_norm, c.rms_eps)
        if L.moe is not None:
            d = moe_ffn(h, L.moe)  # router, then the chosen experts; each row alone, so batching is free
        else:
            gu = ref.linear(h, L.w_gate_up)  # (T, 2F)
            act = ref.geglu if c.activation == "gelu_tanh" else ref.swiglu
            d = ref.linear(act(gu[:, :c.n_ff], gu[:, c.n_ff:]), L.w_down)
        if L.post_ffn_norm is not None:
            d = ref.rms_norm(d, L.post_ffn_norm, c.rms_eps)
        return x + d


class LayerSkipView:
    """NumpyModel.draft_view(): the model minus some layers, behind the same Model protocol. A skipped
    layer is the identity on the residual stream; its slot in a cache is allocated but never written."""

    def __init__(self, model: NumpyModel, skip_layers):
        skip = frozenset(int(i) for i in skip_layers)
        if not skip <= set(range(model.config.n_layers)) or len(skip) >= model.config.n_layers:
            raise InvalidParameterError("skip_layers", f"must name some but not all of layers 0..{model.config.n_layers - 1}")
        self.model, self.skip_layers, self.config = model, skip, model.config

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, n_ctx: int) -> KVCache:
        return self.model.new_cache(n_ctx)

    def new_kv_pool(self, num_blocks: int, block_size: int) -> PagedKVCache:
        return self.model.new_kv_pool(num_blocks, block_size)

    def forward(self, token_ids, positions, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        return self.model.forward(token_ids, positions, cache, all_logits, skip_layers=self.skip_layers)

    def forward_step(self, arrays: dict, kv: PagedKVCache) -> np.ndarray:
        return self.model.forward_step(arrays, kv, skip_layers=self.skip_layers)

    def new_sampler(self, params) -> None:
        return None

    def stats(self) -> dict:
        return {"skip_layers": sorted(self.skip_layers)}

    def close(self) -> None:
        pass
