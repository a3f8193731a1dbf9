"""The numpy reference of a mixture-of-experts FFN: the router and the routed (and shared) experts.

Shapes: T tokens, E model width, X experts, k = experts used per token, F = one expert's width,
S = the shared expert's width. Expert weights are the stacked GGUF tensors in numpy order:
gate/up (X, F, E) fused here as gate_up (X, 2F, E), down (X, E, F), router (X, E).

The formula is llama.cpp's build_moe_ffn (src/llama-graph.cpp) with the settings its qwen2moe,
qwen3moe and llama (Mixtral) graphs pass (gating SOFTMAX, no selection bias, no expert groups,
expert_weights_scale 0 = none, SiLU gate):

    probs   = softmax(h @ router.T)                 over ALL X experts, (T, X), float32
    ids     = top-k of probs per row                (T, k), highest first
    w       = probs[ids]                            (T, k)
    w      /= max(sum(w), 6.103515625e-5)           only when norm (llama, qwen3moe; not qwen2moe)
    out     = sum_j w[:, j] * down[ids_j] @ (silu(gate[ids_j] @ h) * (up[ids_j] @ h))   j = 0..k-1

So the order is softmax over every expert, then top-k, then (optionally) renormalisation. HF's
Mixtral does top-k on the logits and then a softmax over those k: since softmax is monotonic the same
experts win, and softmax(top-k logits) equals the renormalised top-k of the full softmax, so the
two agree (up to rounding). The sum over the k experts runs in slot order (j = 0, 1, ...), as
llama.cpp adds its per-slot views.

Ties: llama.cpp takes the top k from ggml_argsort (std::sort, descending, not stable), so which of
two experts with bit-equal probabilities wins is unspecified there. Here the lower expert index wins
(a stable sort of -probs): deterministic, and what a GPU kernel can reproduce.

qwen2moe's shared expert (src/models/qwen2moe.cpp): every token also runs a dense SwiGLU FFN of width
S, scaled by sigmoid(h . gate_inp_shexp) (llama.cpp computes the sigmoid as silu(x) / x):
    out += sigmoid(h @ gate_inp_shexp) * down_sh @ (silu(gate_sh @ h) * (up_sh @ h))
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aircupy.reference import ops as ref

# llama.cpp clamps the sum of the top-k weights to the smallest normal float16 before dividing.
_NORM_FLOOR = np.float32(6.103515625e-5)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32, max-subtracted."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    # (1 + tanh(x/2)) / 2 never overflows, unlike 1 / (1 + exp(-x)).
    return np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * np.asarray(x, np.float32)))


def route(logits: np.ndarray, k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, X) -> (ids (T, k) int64, weights (T, k) float32), best expert first.

    softmax over all X experts, the k most probable (ties: the lower expert index first), their
    probabilities as weights, renormalised to sum 1 when `norm` (the sum floored at 2^-14)."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or not 0 < k <= logits.shape[1]:
        raise ValueError(f"route: need logits (T, X) and 0 < k <= X, got {logits.shape} and k={k}")
    probs = softmax(logits)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, ids, axis=-1)
    if norm:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), _NORM_FLOOR)
    return ids, w.astype(np.float32, copy=False)


@dataclass
class MoeWeights:
    """One layer's MoE FFN as float32 arrays (reference/model.py loads them)."""
    router: np.ndarray                  # (X, E)
    gate_up: np.ndarray                 # (X, 2F, E): rows [0, F) gate, [F, 2F) up, per expert
    down: np.ndarray                    # (X, E, F)
    n_used: int                         # k
    norm: bool                          # renormalise the top-k weights
    shexp_gate: np.ndarray | None = None      # (E,) the shared expert's gate vector
    shexp_gate_up: np.ndarray | None = None   # (2S, E)
    shexp_down: np.ndarray | None = None      # (E, S)

    @property
    def n_expert(self) -> int:
        return self.router.shape[0]


def expert_ffn(h: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """One SwiGLU expert on rows h (n, E): gate_up (2F, E), down (E, F) -> (n, E)."""
    F = down.shape[1]
    gu = ref.linear(h, gate_up)
    return ref.linear(ref.swiglu(gu[:, :F], gu[:, F:]), down)


def moe_ffn(h: np.ndarray, m: MoeWeights, ids: np.ndarray | None = None,
            weights: np.ndarray | None = None) -> np.ndarray:
    """The MoE FFN of normed rows h (T, E) -> (T, E), the module formula. Each expert runs once on
    the rows routed to it (tokens grouped by expert, as a grouped GEMM would); the per-slot outputs are
    then summed in slot order. ids/weights: a routing to use instead of the router's (tests)."""
    h = np.asarray(h, dtype=np.float32)
    T, E = h.shape
    if ids is None:
        ids, weights = route(ref.linear(h, m.router), m.n_used, m.norm)
    k = ids.shape[1]
    slots = np.zeros((k, T, E), np.float32)          # slot j's weighted expert output per row
    flat = ids.reshape(-1)
    for e in np.unique(flat):
        hit = np.flatnonzero(flat == e)              # (row, slot) pairs routed to e, row-major
        rows, slot = hit // k, hit % k
        y = expert_ffn(h[rows], m.gate_up[e], m.down[e])
        slots[slot, rows] = y * weights[rows, slot][:, None]
    out = slots[0]
    for j in range(1, k):
        out = out + slots[j]
    if m.shexp_gate_up is not None:
        gate = sigmoid(h @ m.shexp_gate)[:, None]    # (T, 1)
        out = out + expert_ffn(h, m.shexp_gate_up, m.shexp_down) * gate
    return out
