"""Mixture of experts on the CPU: the router and expert maths against plain loops, the numpy model's
forward vs forward_step on tiny MoE models of each architecture, Engine generation on the numpy
backend, and the CUDA backend's refusal (which needs no GPU: it comes before cupy is imported)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.engine.backend import load_model
from aircupy.errors import UnsupportedModelError
from aircupy.gguf.reader import GGUFFile
from aircupy.reference import ops as ref
from aircupy.reference.model import NumpyModel
from aircupy.reference.moe import MoeWeights, moe_ffn, route, sigmoid
from aircupy.synth import synth_model
from tests.helpers.batch_drive import batched_greedy, solo_greedy

TINY_MOE = ("tiny-qwen3moe", "tiny-qwen2moe", "tiny-mixtral")


# -- router --------------------------------------------------------------------------------------------

def _route_loop(logits, k, norm):
    """The router one row at a time in Python floats: softmax over every expert, the k largest
    (ties: lower index first), renormalised when norm."""
    ids, ws = [], []
    for row in np.asarray(logits, np.float64):
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        p = [v / sum(ex) for v in ex]
        order = sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]
        w = [p[e] for e in order]
        if norm:
            w = [v / sum(w) for v in w]
        ids.append(order)
        ws.append(w)
    return np.array(ids), np.array(ws)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_a_plain_loop(k, norm):
    logits = np.random.default_rng(k).standard_normal((17, 8)).astype(np.float32) * 3
    ids, w = route(logits, k, norm)
    want_ids, want_w = _route_loop(logits, k, norm)
    assert ids.shape == w.shape == (17, k) and w.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(w, want_w, rtol=2e-6)
    if norm:
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    else:   # the raw softmax probabilities of the chosen experts
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(w, np.take_along_axis(p, ids, 1), rtol=1e-6)
    assert (np.diff(w, axis=1) <= 0).all()   # best expert first


def test_route_ties_go_to_the_lower_expert_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0],
                       [2.0, 2.0, 2.0, 2.0, 2.0],
                       [0.0, 5.0, 1.0, 5.0, 1.0]], np.float32)
    ids, w = route(logits, 2, norm=True)
    assert ids.tolist() == [[1, 2], [0, 1], [1, 3]]
    np.testing.assert_allclose(w, 0.5)
    ids3, _ = route(logits, 3, norm=False)
    assert ids3.tolist() == [[1, 2, 4], [0, 1, 2], [1, 3, 2]]
    np.testing.assert_array_equal(ids3, _route_loop(logits, 3, False)[0])


def test_mixtral_topk_then_softmax_equals_softmax_then_topk_renormalised():
    """HF's Mixtral: top-k of the logits, softmax over those k; llama.cpp (and we): softmax over all,
    top-k, renormalise. Same experts, same weights."""
    logits = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    ids, w = route(logits, 2, norm=True)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    t = np.take_along_axis(logits, top, 1)
    hf = np.exp(t - t.max(1, keepdims=True))
    hf /= hf.sum(1, keepdims=True)
    np.testing.assert_array_equal(ids, top)
    np.testing.assert_allclose(w, hf, rtol=1e-6)


def test_route_rejects_bad_k():
    with pytest.raises(ValueError):
        route(np.zeros((2, 4), np.float32), 5, True)
    with pytest.raises(ValueError):
        route(np.zeros((2, 4), np.float32), 0, True)


def test_sigmoid_is_llama_cpps_silu_over_x():
    x = np.linspace(-30, 30, 601).astype(np.float32)
    x = x[x != 0]
    np.testing.assert_allclose(sigmoid(x), ref.silu(x) / x, rtol=1e-5, atol=1e-30)


# -- the MoE FFN ------------------------------------------------------------------------------------------

def _weights(rng, X=6, E=16, F=8, k=2, norm=True, S=0):
    m = MoeWeights(router=rng.standard_normal((X, E)).astype(np.float32),
                   gate_up=rng.standard_normal((X, 2 * F, E)).astype(np.float32) / 4,
                   down=rng.standard_normal((X, E, F)).astype(np.float32) / 3, n_used=k, norm=norm)
    if S:
        m.shexp_gate = rng.standard_normal(E).astype(np.float32) / 4
        m.shexp_gate_up = rng.standard_normal((2 * S, E)).astype(np.float32) / 4
        m.shexp_down = rng.standard_normal((E, S)).astype(np.float32) / 4
    return m


def _ffn_loop(h, m):
    """The MoE FFN row by row, expert by expert, in float64: the formula of reference/moe.py."""
    def swiglu_ffn(x, gate_up, down):
        F = down.shape[1]
        g, u = gate_up[:F] @ x, gate_up[F:] @ x
        return down @ (g / (1 + np.exp(-g)) * u)
    ids, w = _route_loop(h.astype(np.float64) @ m.router.T.astype(np.float64), m.n_used, m.norm)
    out = np.zeros(h.shape, np.float64)
    for t, x in enumerate(h.astype(np.float64)):
        for j in range(m.n_used):
            e = ids[t, j]
            out[t] += w[t, j] * swiglu_ffn(x, m.gate_up[e].astype(np.float64), m.down[e].astype(np.float64))
        if m.shexp_gate_up is not None:
            gate = 1 / (1 + np.exp(-(x @ m.shexp_gate)))
            out[t] += gate * swiglu_ffn(x, m.shexp_gate_up.astype(np.float64), m.shexp_down.astype(np.float64))
    return out


@pytest.mark.parametrize("k,norm,S", [(1, True, 0), (2, True, 0), (3, False, 0), (2, False, 12), (6, True, 12)])
def test_moe_ffn_matches_a_plain_loop(k, norm, S):
    rng = np.random.default_rng(10 * k + S)
    m = _weights(rng, k=k, norm=norm, S=S)
    h = rng.standard_normal((9, 16)).astype(np.float32)
    got = moe_ffn(h, m)
    want = _ffn_loop(h, m)
    assert got.shape == (9, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_norm_on_and_off_scale_the_experts_by_the_renormalisation():
    rng = np.random.default_rng(3)
    m_on, h = _weights(rng, k=1, norm=True), rng.standard_normal((5, 16)).astype(np.float32)
    m_off = MoeWeights(m_on.router, m_on.gate_up, m_on.down, n_used=1, norm=False)
    _, p = route(ref.linear(h, m_on.router), 1, norm=False)
    # k = 1: normalised weight is exactly 1, unnormalised it is the top probability
    np.testing.assert_allclose(moe_ffn(h, m_off), moe_ffn(h, m_on) * p, rtol=1e-5, atol=1e-7)


def test_shared_expert_is_added_with_its_sigmoid_gate():
    rng = np.random.default_rng(4)
    m = _weights(rng, k=2, norm=False, S=10)
    bare = MoeWeights(m.router, m.gate_up, m.down, n_used=2, norm=False)
    h = rng.standard_normal((7, 16)).astype(np.float32)
    F = m.shexp_down.shape[1]
    gu = h @ m.shexp_gate_up.T
    shared = (ref.silu(gu[:, :F]) * gu[:, F:]) @ m.shexp_down.T
    gate = 1 / (1 + np.exp(-(h @ m.shexp_gate)))
    np.testing.assert_allclose(moe_ffn(h, m) - moe_ffn(h, bare), shared * gate[:, None], rtol=1e-4, atol=1e-6)
    m.shexp_gate = np.zeros(16, np.float32)               # h . g = 0: the gate is half open
    np.testing.assert_allclose(moe_ffn(h, m) - moe_ffn(h, bare), 0.5 * shared, rtol=1e-4, atol=1e-6)
    m.shexp_gate = -10.0 * h[0]                             # h0 . g = -10 |h0|^2 << 0: closed for row 0
    np.testing.assert_allclose(moe_ffn(h[:1], m), moe_ffn(h[:1], bare), atol=1e-6)


def test_given_routing_is_used():
    rng = np.random.default_rng(5)
    m = _weights(rng, k=2)
    h = rng.standard_normal((3, 16)).astype(np.float32)
    ids = np.array([[0, 5], [5, 0], [3, 3]])
    w = np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]], np.float32)
    got = moe_ffn(h, m, ids, w)
    one = [ref.linear(h, m.gate_up[e]) for e in (0, 3, 5)]
    y = {e: ref.linear(ref.swiglu(g[:, :8], g[:, 8:]), m.down[e]) for e, g in zip((0, 3, 5), one)}
    want = np.stack([y[0][0], 0.25 * y[5][1] + 0.75 * y[0][1], y[3][2]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- the numpy model on tiny MoE files --------------------------------------------------------------------

@pytest.fixture(scope="module", params=TINY_MOE)
def tiny_moe(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / f"{request.param}.gguf"
    synth_model(path, request.param, "F32", seed=7)
    g = GGUFFile(path)
    c = ModelConfig.from_gguf(g)
    return request.param, path, g, c, NumpyModel(g, c)


def test_tiny_moe_configs(tiny_moe):
    name, _, _, c, m = tiny_moe
    assert c.is_moe and m.layers[0].moe is not None and m.layers[0].w_gate_up is None
    want = {"tiny-qwen3moe": (8, 3, 64, 0, True), "tiny-qwen2moe": (8, 2, 64, 128, False),
            "tiny-mixtral": (4, 2, 96, 0, True)}[name]
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.n_ff_shexp, c.expert_weights_norm) == want
    assert c.rope_type == ("norm" if c.arch == "llama" else "neox")
    assert m.layers[0].moe.gate_up.shape == (c.n_expert, 2 * c.n_ff_exp, c.n_embd)


def test_forward_uses_several_experts_and_prefill_equals_decode(tiny_moe):
    """Routing is per token, so a prefill and a token-by-token decode give the same logits."""
    _, _, _, c, m = tiny_moe
    ids = np.random.default_rng(1).integers(4, c.vocab_size, 24).astype(np.int32)
    pos = np.arange(24, dtype=np.int32)
    full = m.forward(ids, pos, m.new_cache(32), all_logits=True)
    cache = m.new_cache(32)
    steps = np.concatenate([m.forward(ids[i:i + 1], pos[i:i + 1], cache) for i in range(24)])
    assert np.isfinite(full).all()
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-4 * np.abs(full).max())
    h = ref.rms_norm(m.embed(ids), m.layers[0].ffn_norm, c.rms_eps)   # the tokens reach most experts
    used, _ = route(ref.linear(h, m.layers[0].moe.router), c.n_expert_used, c.expert_weights_norm)
    assert len(np.unique(used)) >= c.n_expert - 1


def test_forward_step_matches_solo_forward(tiny_moe):
    """The batched path (reference/batch.py, a paged pool, steps mixing prefill chunks and decode rows)
    gives each sequence its solo greedy tokens and logits, as for the dense models."""
    _, _, _, c, m = tiny_moe
    rng = np.random.default_rng(2)
    prompts = [rng.integers(4, c.vocab_size, int(n)).tolist() for n in (1, 5, 17, 9, 30, 2)]
    out, _ = batched_greedy(m, prompts, 12, num_blocks=40, block_size=4, max_batched_tokens=16,
                                max_num_seqs=4)
    for p, (toks, logits) in zip(prompts, out):
        solo_toks, solo_logits = solo_greedy(m, p, 12)
        assert toks == solo_toks
        rel = np.abs(logits - solo_logits) / np.abs(solo_logits).max(axis=-1, keepdims=True)
        assert rel.max() <= 1e-4, rel.max()


def test_engine_generates_greedily_on_the_numpy_backend(tiny_moe):
    from aircupy import Engine
    _, path, _, _, m = tiny_moe
    engine = Engine(str(path), backend="numpy")
    prompt = [5, 77, 300, 42, 9]
    res = engine.generate(prompt, max_tokens=10, temperature=0, ignore_eos=True)
    assert res.finish_reason == "length" and len(res.token_ids) == 10
    want, _ = solo_greedy(m, prompt, 10)
    assert list(res.token_ids) == want
    again = engine.generate(engine.tokenize("hello world") + [7], max_tokens=4, temperature=0)
    assert len(again.token_ids) >= 1


# -- the CUDA backend refuses MoE files (checked on the CPU) -----------------------------------------------

def test_cuda_backend_refuses_moe_before_touching_cupy(tiny_moe):
    _, path, g, c, _ = tiny_moe
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts .* not supported by the CUDA backend"):
        load_model("cuda", g, c)
    from aircupy.cuda.placement import Footprint
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        Footprint.of(g, c, 64)
    from aircupy.inspect import describe_plan
    with pytest.raises(UnsupportedModelError, match="use --backend numpy"):
        describe_plan(path, 4 << 30, host_ram_bytes=1 << 30)
