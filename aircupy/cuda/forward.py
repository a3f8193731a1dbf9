"""The transformer forward pass on the GPU: a fixed sequence of kernel launches over pool buffers.

Nothing here allocates or synchronizes, so the T = 1 pass can be captured as a CUDA graph. Every
dynamic value (token ids, positions) is read from device buffers. Activations are float32 between
kernels (the kernels' contract, aircupy/cuda/ops); the KV cache is float16.

Per layer, with x the residual (T, E) and h a normed copy (numpy twin: aircupy/reference/model.py):
    h = rms_norm(x)                   qkv = h @ Wqkv^T (+ b)       [q/k rms_norm per head]
    rope(q), rope(k) + kv_store(k, v at pos) (one launch)        a = attention(q, cache, pos)
    x += a @ Wo^T                     (gemma: x += rms_norm(a @ Wo^T) * post_attn_norm)
    h = rms_norm(x)                   g = glu(h @ Wgate_up^T)      x += g @ Wdown^T (gemma: post-norm)
Head: logits = rms_norm(x[rows]) @ Wout^T, in groups of HEAD_ROWS rows (the matvec path: no
(V, E) fp16 dequantization scratch for a 128k-token vocabulary).
Decode rows (T <= 8) fuse launches (bench/NOTES_kernels.md has the per-kernel figures): rms_norm into
the fused qkv / gate_up / head matvecs (matvec norm_w), glu into the down projection's pre-quantized x
(glu_quant + matvec_xq), rope + kv_store always. A decode step of a llama layer is 8 kernels.
"""
from __future__ import annotations

import numpy as np

from aircupy.cuda.buffers import Buffers
from aircupy.cuda.weights import WeightTable


class ForwardPass:
    """Launch sequence of the model: run(ids, pos, T, kv) over every layer, then head(r0, r1)."""

    def __init__(self, lib, config, glob: WeightTable, weights, buf: Buffers):
        """weights: the layers' weight source (cuda/weights.py ResidentWeights or cuda/streamed.py
        StreamedWeights): begin_pass(kv), acquire(i) -> WeightTable, release(i), end_pass(), abort()."""
        from aircupy.cuda import ops
        from aircupy.cuda.ops import layers as cuda_layers, matmul as cuda_matmul
        self.lay, self.mm = cuda_layers, cuda_matmul  # the fused decode launchers
        self.ops, self.lib, self.c, self.g, self.weights, self.b = ops, lib, config, glob, weights, buf
        c = config
        self.qd, self.kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.glu_kind = "geglu" if c.activation == "gelu_tanh" else "swiglu"
        # Prefill GEMM operands: bf16 where activations can pass fp16's 65504 (gemma3's are large).
        self.half = "bf16" if c.arch == "gemma3" else "f16"
        # Per layer: (rope base, RopeScaling) of its kind (sliding-window layers may differ).
        self.rope = []
        for i in range(c.n_layers):
            local = c.swa_layers[i]
            self.rope.append((float(c.rope_base_local if local else c.rope_base),
                              c.rope_scaling_local if local else c.rope_scaling))

    def _linear(self, x, w, out, *, accumulate=False, bias=None):
        self.ops.linear(self.lib, x, w, out, accumulate=accumulate, bias=bias, scratch=self.b.scratch,
                        half=self.half)

    def embed(self, ids, T: int) -> None:
        self.ops.get_rows(self.lib, self.g.token_embd, ids, self.b.x[:T],
                          scale=float(self.c.embed_scale))

    def layer(self, i: int, L: WeightTable, pos, T: int, kv) -> None:
        c, b, ops, lib = self.c, self.b, self.ops, self.lib
        x, h = b.x[:T], b.h[:T]
        # Decode rows (T <= 8, the matvec path): the pre-norms ride in the fused qkv / gate_up matvecs
        # (each block normalizes x as it stages it), and glu writes the down projection's quantized x.
        mv = T <= ops.MAX_MATVEC_ROWS
        q, k, v = b.q[:T], b.k[:T], b.v[:T]
        if L.qkv is not None:
            qkv = b.qkv[:T]
            if mv:
                self.mm.matvec(lib, x, L.qkv, qkv, bias=L.b_qkv, norm_w=L.attn_norm, eps=c.rms_eps)
            else:
                ops.rms_norm(lib, x, L.attn_norm, h, c.rms_eps)
                self._linear(h, L.qkv, qkv, bias=L.b_qkv)
            if T == 1:  # one row: the column slices are contiguous, view them
                q = qkv[:, :self.qd].reshape(1, c.n_head, c.head_dim)
                k = qkv[:, self.qd:self.qd + self.kvd].reshape(1, c.n_head_kv, c.head_dim)
                v = qkv[:, self.qd + self.kvd:].reshape(1, c.n_head_kv, c.head_dim)
            else:  # strided columns -> contiguous per-head buffers (cupy copy kernels)
                q.reshape(T, self.qd)[...] = qkv[:, :self.qd]
                k.reshape(T, self.kvd)[...] = qkv[:, self.qd:self.qd + self.kvd]
                v.reshape(T, self.kvd)[...] = qkv[:, self.qd + self.kvd:]
        else:
            ops.rms_norm(lib, x, L.attn_norm, h, c.rms_eps)
            self._linear(h, L.q, q.reshape(T, self.qd), bias=L.b_q)
            self._linear(h, L.k, k.reshape(T, self.kvd), bias=L.b_k)
            self._linear(h, L.v, v.reshape(T, self.kvd), bias=L.b_v)
        if L.q_norm is not None:
            q2, k2 = q.reshape(T * c.n_head, c.head_dim), k.reshape(T * c.n_head_kv, c.head_dim)
            ops.rms_norm(lib, q2, L.q_norm, q2, c.rms_eps)
            ops.rms_norm(lib, k2, L.k_norm, k2, c.rms_eps)
        base, scaling = self.rope[i]
        kc, vc = kv.layer(i)
        slots, seq, tables = kv.addressing(pos)
        # rope(q), rope(k) and the KV-cache write of k, v: one launch (any T; q, k, v contiguous)
        self.lay.rope_kv_store(lib, q, k, v, kc, vc, pos, slots=slots, base=base, mode=c.rope_type,
                               rope_dim=c.rope_dim, scaling=scaling, freq_factors=self.g.rope_freqs)
        a = b.attn[:T]
        for r0, r1, kernel in kv.segments(T):   # one launch, or a batch's decode rows and each prompt
            ops.attention(lib, q[r0:r1], kc, vc, pos[r0:r1], a[r0:r1], scale=float(c.attn_scale),
                          window=int(c.layer_window(i) or 0), softcap=float(c.attn_softcap or 0.0),
                          seq=None if seq is None else seq[r0:r1], tables=tables, kernel=kernel,
                          scratch=b.scratch)
        self._residual(a, L.wo, L.bo, L.post_attn_norm, T)
        if L.gate_up is not None and mv:
            gu = b.gu[:T]
            self.mm.matvec(lib, x, L.gate_up, gu, norm_w=L.ffn_norm, eps=c.rms_eps)
            if self.mm.takes_xq(L.down) and L.post_ffn_norm is None:
                xq = b.act[:T].view(np.uint8)  # (T, 4F) bytes hold the (T, 2.375F) quantized rows
                self.lay.glu_quant(lib, gu, xq, self.glu_kind)
                self.mm.matvec_xq(lib, xq, T, L.down, x, accumulate=True)
                return
            ops.glu(lib, gu, b.act[:T], self.glu_kind)
        elif L.gate_up is not None:
            ops.rms_norm(lib, x, L.ffn_norm, h, c.rms_eps)
            gu = b.gu[:T]
            self._linear(h, L.gate_up, gu)
            ops.glu(lib, gu, b.act[:T], self.glu_kind)
        else:
            ops.rms_norm(lib, x, L.ffn_norm, h, c.rms_eps)
            self._linear(h, L.gate, b.gate[:T])
            self._linear(h, L.up, b.up[:T])
            glu = ops.geglu if self.glu_kind == "geglu" else ops.swiglu
            glu(lib, b.gate[:T], b.up[:T], b.act[:T])
        self._residual(b.act[:T], L.down, None, L.post_ffn_norm, T)

    def _residual(self, inp, w, bias, post_norm, T: int) -> None:
        """x += inp @ w^T (+ bias), or with gemma's post-norm x += rms_norm(inp @ w^T) * post_norm."""
        x = self.b.x[:T]
        if post_norm is None:
            self._linear(inp, w, x, accumulate=True, bias=bias)
        else:
            tmp = self.b.tmp[:T]
            self._linear(inp, w, tmp, bias=bias)
            self.ops.rms_norm_add(self.lib, tmp, post_norm, x, self.c.rms_eps)

    def head(self, r0: int, r1: int, src=None):
        """Logits of rows [r0, r1) (r1 - r0 <= HEAD_ROWS) of the residual (or of `src`, (rows, E))
        into logits[:r1-r0]; returns them."""
        n = r1 - r0
        x = (self.b.x if src is None else src)[r0:r1]
        hin, out = self.b.head_in[:n], self.b.logits[:n]
        w = self.g.output if self.g.output is not None else self.g.token_embd
        if n <= self.ops.MAX_MATVEC_ROWS:  # final norm fused into the head matvec
            self.mm.matvec(self.lib, x, w, out, norm_w=self.g.output_norm, eps=self.c.rms_eps)
        else:
            self.ops.rms_norm(self.lib, x, self.g.output_norm, hin, self.c.rms_eps)
            self._linear(hin, w, out)
        if self.c.final_softcap:
            self.ops.softcap(self.lib, out, float(self.c.final_softcap))
        return out

    def run(self, ids, pos, T: int, kv) -> None:
        """Embed T tokens and run every layer (their keys/values land in kv at pos; kv is a cache, a
        batch step's StepKV, or with the KV shuttle the pass's PassKV: cuda/kv.py). A layer's weights come from the weight source, which
        for a streamed layer makes the compute stream wait for its slot's upload."""
        self.embed(ids, T)
        w = self.weights
        w.begin_pass(kv)
        try:
            for i in range(self.c.n_layers):
                self.layer(i, w.acquire(i), pos, T, kv)
                w.release(i)
            w.end_pass()
        except BaseException:
            w.abort()
            raise
