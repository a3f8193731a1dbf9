"""Activation buffers and scratch of the CUDA model: sized once from the config, carved from the pool.

Buffers hold `rows` token rows (the prefill chunk); a pass over T <= rows tokens uses [:T] of each, so
decode (T = 1) and prefill share them. Shapes (E = n_embd, H/Hkv heads, D = head_dim, F = n_ff,
V = vocab), float32 unless noted:
    x, h, tmp (rows, E)       qkv (rows, H*D + 2*Hkv*D)       q (rows, H, D)  k, v (rows, Hkv, D)
    attn (rows, H*D)          gu (rows, 2F) (gate/up views share its memory)   act (rows, F)
    head_in (hr, E)           logits (hr, V)                  hr = HEAD_ROWS
    ids, pos int32 (rows,)    token int32 (hr,) sampled ids
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


def _shapes(c, rows: int, hr: int) -> dict[str, tuple[tuple[int, ...], type]]:
    E, H, Hkv, D, F, V = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.vocab_size
    f32, i32 = np.float32, np.int32
    return {
        "x": ((rows, E), f32), "h": ((rows, E), f32), "tmp": ((rows, E), f32),
        "qkv": ((rows, (H + 2 * Hkv) * D), f32), "q": ((rows, H, D), f32),
        "k": ((rows, Hkv, D), f32), "v": ((rows, Hkv, D), f32), "attn": ((rows, H * D), f32),
        "gu": ((rows, 2 * F), f32), "act": ((rows, F), f32),
        "head_in": ((hr, E), f32), "logits": ((hr, V), f32),
        "ids": ((rows,), i32), "pos": ((rows,), i32), "token": ((hr,), i32), "io": ((8,), i32),
    }


def plan_buffers(plan, c, rows: int, hr: int) -> None:
    for name, (shape, dt) in _shapes(c, rows, hr).items():
        plan.add(f"act.{name}", int(np.prod(shape)) * np.dtype(dt).itemsize, "activations")


def make_buffers(pool, c, rows: int, hr: int) -> Buffers:
    views = {name: pool.array(f"act.{name}", shape, dt)
             for name, (shape, dt) in _shapes(c, rows, hr).items()}
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
