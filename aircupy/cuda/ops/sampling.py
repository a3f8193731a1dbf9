"""Typed launchers of the device sampler (cuda_src/sample.cu): only token ids leave the GPU.

Per-row settings live in device arrays, so one captured graph serves any mix of requests:
  params  fp32 (B, 4) = [temperature, top_k, top_p, min_p]   (temperature 0: argmax; top_k 0: off)
  rng     uint32 (B, 2) = [seed, counter]                    (counter += 1 on the device per draw)
Penalties are applied beforehand, in place, from a sparse per-row table the host keeps (ids unique per
row, -1 for unused slots), in engine/sampler.py's order: logit bias, repeat penalty (ids with rep = 1),
presence/frequency (generated counts). Candidate order and cuts follow engine/sampler.Sampler, except
that top-p without top-k is the exact nucleus over the whole vocabulary; the draw is Gumbel-max with
aircupy/cuda/ops/gumbel.py's noise (same distribution as the numpy inverse-CDF draw, different stream).
"""
from __future__ import annotations

import numpy as np

from aircupy.cuda.ops.launch import check, launch


def argmax(lib, logits, out, *, stream=None) -> None:
    """out[b] = argmax(logits[b]) (lowest id among ties); logits fp32 (B, V), out int32 (B,)."""
    check(logits, np.float32, None, "logits")
    b, v = (int(s) for s in logits.shape)
    check(out, np.int32, (b,), "out")
    launch(lib.fn("argmax_rows"), (b,), (1024,), (logits, out, np.int32(v)), stream)


def apply_penalties(lib, logits, ids, bias, rep, counts, params, *, stream=None) -> None:
    """In place on logits (B, V): per slot p of row b with ids[b, p] >= 0: x += bias; if rep: repetition
    penalty params[b, 0]; if counts > 0: x -= params[b, 1] + params[b, 2] * counts. Shapes (B, P):
    ids int32, bias fp32, rep int32 (0/1), counts fp32; params fp32 (B, 4)."""
    check(logits, np.float32, None, "logits")
    b, v = (int(s) for s in logits.shape)
    p = int(ids.shape[1])
    check(ids, np.int32, (b, p), "ids")
    check(bias, np.float32, (b, p), "bias")
    check(rep, np.int32, (b, p), "rep")
    check(counts, np.float32, (b, p), "counts")
    check(params, np.float32, (b, 4), "params")
    launch(lib.fn("apply_penalties"), (b,), (128,), (logits, ids, bias, rep, counts, params, np.int32(v),
                                                      np.int32(p)), stream)


def sample(lib, logits, params, rng, out, *, stream=None) -> None:
    """out[b] = a token drawn from logits[b] under params[b] with noise rng[b]; rng[b, 1] += 1."""
    check(logits, np.float32, None, "logits")
    b, v = (int(s) for s in logits.shape)
    check(params, np.float32, (b, 4), "params")
    check(rng, np.uint32, (b, 2), "rng")
    check(out, np.int32, (b,), "out")
    launch(lib.fn("sample_rows"), (b,), (1024,), (logits, params, rng, out, np.int32(v)), stream)
