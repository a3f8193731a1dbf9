"""GPU tier: device argmax, penalties and sampler against engine/sampler.py and the Gumbel twin.

The device draw is Gumbel-max with noise from aircupy/cuda/ops/gumbel.py, so the expected token is exact:
argmax over the numpy sampler's candidate set of log(prob) + g_i. A wrong cut (top-k, top-p, min-p)
changes the candidate set and, over many seeds, the tokens. Top-p without top-k is checked against the
exact nucleus (the numpy sampler renormalises over a partial prefix there; see the note in
/work/notes/requests.md). Logits are random floats: exact ties between candidates do not occur.
"""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.engine.params import SamplingParams
from aircupy.engine.sampler import Sampler
from aircupy.reference.gumbel import gumbel_noise

cp = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu

from aircupy.cuda.kernels import KernelLibrary  # noqa: E402
from aircupy.cuda import ops  # noqa: E402


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


def test_argmax_lowest_id_on_ties(lib):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 262144)).astype(np.float32)
    x[1, [5, 70000, 200000]] = 50.0
    x[2, :] = -1.0
    out = cp.full(3, -7, dtype=cp.int32)
    ops.argmax(lib, cp.asarray(x), out)
    assert cp.asnumpy(out).tolist() == [int(np.argmax(x[0])), 5, 0]


def test_penalties_match_numpy_sampler(lib):
    rng = np.random.default_rng(1)
    v = 1000
    logits = rng.standard_normal(v).astype(np.float32) * 3
    prompt = [3, 5, 5, 9, 700]
    sp = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=4, presence_penalty=0.5,
                        frequency_penalty=0.25, logit_bias={9: 2.0, 11: -1.5})
    s = Sampler(sp, v, prompt)
    for tok in (5, 11, 11):
        s.accept(tok)
    want = s.process(logits)
    # host-side sparse table, as the runtime builds it
    window = (prompt + [5, 11, 11])[-4:]
    gen = {5: 1, 11: 2}
    ids = sorted(set(window) | set(gen) | {9, 11})
    table = np.full((1, 8), -1, np.int32)
    table[0, :len(ids)] = ids
    bias = np.zeros((1, 8), np.float32)
    rep = np.zeros((1, 8), np.int32)
    counts = np.zeros((1, 8), np.float32)
    for j, i in enumerate(ids):
        bias[0, j] = sp.logit_bias.get(i, 0.0)
        rep[0, j] = i in window
        counts[0, j] = gen.get(i, 0)
    params = np.array([[1.3, 0.5, 0.25, 0.0]], np.float32)
    d = cp.asarray(logits[None])
    ops.apply_penalties(lib, d, cp.asarray(table), cp.asarray(bias), cp.asarray(rep), cp.asarray(counts),
                        cp.asarray(params))
    np.testing.assert_allclose(cp.asnumpy(d)[0], want, rtol=1e-6, atol=1e-6)


def _exact_nucleus(x, top_p):
    e = np.exp(x - x.max())
    ids = np.lexsort((np.arange(len(x)), -x))
    cdf = np.cumsum(e[ids]) / e.sum()
    keep = int(np.searchsorted(cdf, top_p, side="left")) + 1
    return ids[:keep], e[ids[:keep]]


CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (0.8, 40, 1.0, 0.0), (0.7, 40, 0.9, 0.0), (1.0, 0, 1.0, 0.05),
    (0.8, 40, 0.95, 0.05), (1.5, 1000, 0.5, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 1, 1.0, 0.0),
]


@pytest.mark.parametrize("v", [1000, 151936])
@pytest.mark.parametrize("temp,top_k,top_p,min_p", CASES)
def test_sample_matches_gumbel_twin(lib, v, temp, top_k, top_p, min_p):
    rng = np.random.default_rng(v + top_k)
    b = 16
    logits = (rng.standard_normal((b, v)) * 2.5).astype(np.float32)
    seeds = np.arange(b, dtype=np.uint32) * 7919 + 3
    rngs = np.stack([seeds, np.full(b, 41, np.uint32)], axis=1)
    params = np.tile(np.array([temp, top_k, top_p, min_p], np.float32), (b, 1))
    out = cp.full(b, -1, dtype=cp.int32)
    d_rng = cp.asarray(rngs)
    ops.sample(lib, cp.asarray(logits), cp.asarray(params), d_rng, out)
    got = cp.asnumpy(out)
    sp = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    for r in range(b):
        if top_k == 0 and top_p < 1.0:
            x = logits[r].astype(np.float64) / temp
            ids, probs = _exact_nucleus(x, top_p)
            if min_p > 0:
                keep = probs >= min_p * probs.max()
                ids, probs = ids[keep], probs[keep]
        else:
            ids, probs = Sampler(sp, v).candidates(logits[r])
        score = np.log(probs / probs.max()) + gumbel_noise(int(seeds[r]), 41, ids).astype(np.float64)
        assert got[r] == ids[int(np.argmax(score))], (r, len(ids))
    assert np.array_equal(cp.asnumpy(d_rng)[:, 1], np.full(b, 42))


def test_sample_temperature_zero_is_argmax(lib):
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((4, 5000)).astype(np.float32)
    params = np.tile(np.array([0.0, 40, 0.9, 0.05], np.float32), (4, 1))
    out = cp.full(4, -1, dtype=cp.int32)
    ops.sample(lib, cp.asarray(logits), cp.asarray(params), cp.zeros((4, 2), cp.uint32), out)
    assert cp.asnumpy(out).tolist() == np.argmax(logits, axis=1).tolist()


def test_sample_distribution(lib):
    """Over many counters the draws follow softmax(z) of the candidates (chi-square, 3 tokens)."""
    logits = np.full((1, 50), -30.0, np.float32)
    logits[0, [3, 17, 40]] = [0.0, np.log(2.0), np.log(5.0)]
    params = np.array([[1.0, 0, 1.0, 0.0]], np.float32)
    d_log, d_par = cp.asarray(logits), cp.asarray(params)
    d_rng = cp.asarray(np.array([[12345, 0]], np.uint32))
    out = cp.zeros(1, cp.int32)
    draws = []
    for _ in range(4000):
        ops.sample(lib, d_log, d_par, d_rng, out)
        draws.append(int(out.get()[0]))
    counts = np.array([draws.count(i) for i in (3, 17, 40)])
    expected = 4000 * np.array([1, 2, 5]) / 8
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.sum() == 4000 and chi2 < 13.8  # 2 dof, p = 0.001
