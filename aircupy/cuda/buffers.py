"""Activation buffers and scratch of the CUDA model: sized once from the config, carved from the pool.

Buffers hold `rows` token rows (the prefill chunk); a pass over T <= rows tokens uses [:T] of each, so
decode (T = 1) and prefill share them. Shapes (E = n_embd, H/Hkv heads, D = head_dim, F = n_ff,
V = vocab), float32 unless noted:
    x, h, tmp (rows, E)       qkv (rows, H*D + 2*Hkv*D)       q (rows, H, D)  k, v (rows, Hkv, D)
    attn (rows, H*D)          gu (rows, 2F) (gate/up views share its memory)   act (rows, F)
    head_in (hr, E)           logits (hr, V)                  hr = HEAD_ROWS
    ids, pos int32 (rows,)    token int32 (max(hr, seqs),) sampled ids
    step int32: a continuous-batching step's inputs, uploaded in one copy (StepLayout below): per row
        ids, positions, slots, table index; the block tables (seqs, max_blocks); per logits row its
        row, rng (uint32 seed, counter) and float32 sampling params (temperature, top_k, top_p, min_p)
    io int32 (8,): the per-step inputs of a graph-replayed decode step, uploaded in one copy:
        [0] token id  [1] position  [2:4] rng (uint32 seed, counter)  [4:8] float32 sampling params
        (temperature, top_k, top_p, min_p); dec, rng and sparams are typed views of it.
One `scratch` region (uint8) is shared by everything that needs temporary device memory and is never
live at the same time as another user: the weight-upload staging, the prefill GEMM's fp16
dequantization of one weight matrix, the split-K partials of decode attention, the sampler's sort.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aircupy.cuda.layout import raw_nbytes


@dataclass
class Buffers:
    x: object
    h: object
    tmp: object
    qkv: object
    q: object
    k: object
    v: object
    attn: object
    gu: object
    gate: object
    up: object
    act: object
    head_in: object
    logits: object
    ids: object
    pos: object
    token: object
    io: object
    dec: object = None      # io[0:2] int32: [token, position]
    rng: object = None      # io[2:4] as uint32 (1, 2)
    sparams: object = None  # io[4:8] as float32 (1, 4)
    scratch: object = None
    step: object = None     # int32 (StepLayout.size,)


@dataclass(frozen=True)
class StepLayout:
    """Where each input of a batch step lies in the `step` buffer (int32 words): rows of the pass,
    seqs sequences (block tables and logits rows), max_blocks blocks per table."""
    rows: int
    seqs: int
    max_blocks: int

    def parts(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (word offset, shape); rng and sparams hold uint32 / float32 bits."""
        r, s, b = self.rows, self.seqs, self.max_blocks
        out, off = {}, 0
        for name, shape in (("ids", (r,)), ("pos", (r,)), ("slots", (r,)), ("seq", (r,)),
                            ("tables", (s, b)), ("lrows", (s,)), ("rng", (s, 2)), ("sparams", (s, 4))):
            out[name] = (off, shape)
            off += int(np.prod(shape))
        return out

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in self.parts().values())

    def views(self, buf) -> dict:
        """Typed views of a flat int32 array (device or pinned host) laid out as parts()."""
        out = {}
        for name, (off, shape) in self.parts().items():
            v = buf[off:off + int(np.prod(shape))].reshape(shape)
            out[name] = v.view(np.uint32) if name == "rng" else v.view(np.float32) if name == "sparams" else v
        return out


def _shapes(c, rows: int, hr: int, seqs: int = 1, max_blocks: int = 1) -> dict[str, tuple[tuple[int, ...], type]]:
    E, H, Hkv, D, F, V = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.vocab_size
    f32, i32 = np.float32, np.int32
    return {
        "x": ((rows, E), f32), "h": ((rows, E), f32), "tmp": ((rows, E), f32),
        "qkv": ((rows, (H + 2 * Hkv) * D), f32), "q": ((rows, H, D), f32),
        "k": ((rows, Hkv, D), f32), "v": ((rows, Hkv, D), f32), "attn": ((rows, H * D), f32),
        "gu": ((rows, 2 * F), f32), "act": ((rows, F), f32),
        "head_in": ((hr, E), f32), "logits": ((hr, V), f32),
        "ids": ((rows,), i32), "pos": ((rows,), i32), "token": ((max(hr, seqs),), i32), "io": ((8,), i32),
        "step": ((StepLayout(rows, seqs, max_blocks).size,), i32),
    }


def plan_buffers(plan, c, rows: int, hr: int, seqs: int = 1, max_blocks: int = 1) -> None:
    for name, (shape, dt) in _shapes(c, rows, hr, seqs, max_blocks).items():
        plan.add(f"act.{name}", int(np.prod(shape)) * np.dtype(dt).itemsize, "activations")


def make_buffers(pool, c, rows: int, hr: int, seqs: int = 1, max_blocks: int = 1) -> Buffers:
    views = {name: pool.array(f"act.{name}", shape, dt)
             for name, (shape, dt) in _shapes(c, rows, hr, seqs, max_blocks).items()}
    F = c.n_ff
    views["gate"] = pool.array("act.gu", (rows, F), np.float32)
    views["up"] = pool.array("act.gu", (rows, F), np.float32, offset=rows * F * 4)
    buf = Buffers(**views)
    buf.dec = buf.io[0:2]
    buf.rng = buf.io[2:4].view(np.uint32).reshape(1, 2)
    buf.sparams = buf.io[4:8].view(np.float32).reshape(1, 4)
    buf.scratch = pool.array("scratch", pool.plan.regions["scratch"].nbytes, np.uint8)
    return buf


def scratch_nbytes(ops, c, layouts, tensors, rows: int, hr: int) -> int:
    """The largest temporary any user of the shared scratch needs (see module doc)."""
    from aircupy.cuda.ops.packing import needs_repack

    need = [256]
    for lay in layouts:
        for p in lay.matrices():
            if needs_repack(p.ggml_type):  # upload staging holds one raw source tensor
                need += [raw_nbytes(tensors, name) for name, _ in p.sources]
    for lay in layouts[1:]:  # layer matrices go through the GEMM path in prefill; the head never
        for p in lay.matrices():
            need.append(int(ops.linear_scratch_nbytes(p.shape[0], p.shape[1], rows)))
    need.append(int(ops.attention_scratch_nbytes(hr, c.n_head, c.head_dim)))
    if hasattr(ops, "sample_scratch_nbytes"):
        need.append(int(ops.sample_scratch_nbytes(hr, c.vocab_size)))
    return max(need)
