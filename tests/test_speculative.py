"""engine/speculative.py and engine/drafters.py on synthetic distributions: prompt lookup, the acceptance
rule (greedy, and the speculative-sampling rule whose output must be distributed as the target's,
checked by chi-square over many seeded draws, with a control that the same test rejects a wrong
distribution), adaptive k, the speculator's bookkeeping, and llama.cpp's vocabulary compatibility rule."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from aircupy.engine.drafters import ModelProposer, NgramProposer, check_draft_vocab
from aircupy.engine.params import SamplingParams
from aircupy.engine.sampler import Sampler
from aircupy.engine.speculative import AdaptiveK, Draft, Speculator, accept_draft, draw
from aircupy.errors import InvalidParameterError
from tests.helpers.chi2 import chi_square

P_MIN = 1e-3     # a correct rule fails this by chance once in a thousand runs; the seeds are fixed


def test_prompt_lookup_takes_the_longest_most_recent_match():
    ng = NgramProposer(n_max=3, n_min=1)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    toks = [5, 6, 7, 8, 9, 6, 7, 1, 2, 5, 6, 7]
    # "5 6 7" (n=3) occurs at 0 -> proposes 8 9 6; the later "6 7" at 5 is only a 2-gram match
    assert ng.propose(0, toks, 3).tokens == [8, 9, 6]
    assert ng.propose(0, toks[:-1] + [3, 7], 2).tokens == [1, 2]    # n=1: the most recent earlier 7
    assert ng.propose(0, [1, 2, 3], 4).tokens == []                  # nothing repeats
    assert ng.propose(0, toks, 0).tokens == [] and ng.propose(0, [4], 3).tokens == []
    assert ng.propose(0, [1, 2, 1, 2, 1, 2], 5).tokens == [1, 2]     # runs up to the end of the text
    assert NgramProposer(2, 2).propose(0, [9, 4, 7, 3, 7], 2).tokens == []   # a 1-gram would match


def _sampler(vocab=5, **kw):
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 7, **kw}
    return Sampler(SamplingParams(**kw), vocab_size=vocab)


def test_greedy_acceptance_is_the_longest_agreeing_prefix_plus_the_targets_token():
    rows = np.eye(6, dtype=np.float32)[[2, 3, 4, 1]] * 5                # argmax per row: 2 3 4 1
    s = Sampler(SamplingParams(temperature=0.0), 6)
    assert accept_draft(Draft([2, 3, 4]), rows, s) == [2, 3, 4, 1]     # all accepted + bonus
    assert accept_draft(Draft([2, 0, 4]), rows, s) == [2, 3]           # corrected at the first miss
    assert accept_draft(Draft([5, 3, 4]), rows, s) == [2]
    assert accept_draft(Draft([]), rows[:1], s) == [2]                 # an ordinary decode row
    assert s._history == [2, 3, 4, 1, 2, 3, 2, 2]                      # emitted tokens recorded in order
    with pytest.raises(ValueError):
        accept_draft(Draft([2, 3]), rows, s)                           # k drafts need k + 1 rows


@pytest.mark.parametrize("kw", [{"top_k": 5}, {"top_p": 0.7}, {"min_p": 0.2},
                                {"temperature": 0.5, "repeat_penalty": 1.3}, {"logit_bias": {3: 4.0}}])
def test_probs_is_the_distribution_sample_draws_from(kw):
    """Sampler.probs (what the acceptance rule calls p) against sample()'s own draws, in the same state
    (one token in the penalty history): 2000 fresh seeded samplers, chi-square."""
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32) * 2
    first = int(np.argmax(logits))

    def sampler(seed):
        s = _sampler(vocab=50, seed=seed, **kw)
        s.accept(first)
        return s

    p = sampler(0).probs(logits)
    assert abs(p.sum() - 1) < 1e-12
    counts = np.bincount([sampler(i).sample(logits) for i in range(2000)], minlength=50)
    assert chi_square(counts, p)[2] > P_MIN


def test_greedy_probs_is_a_point_mass_on_samples_choice():
    logits = np.random.default_rng(1).normal(size=50).astype(np.float32)
    g = Sampler(SamplingParams(temperature=0.0, logit_bias={7: 50.0}), 50)
    assert g.probs(logits)[7] == 1.0 and g.probs(logits).sum() == 1.0 and g.sample(logits) == 7


def _chain(seed, V=5, scale=1.5):
    """A Markov 'model': log-probabilities (V, V) of the next token given the last."""
    return np.random.default_rng(seed).normal(size=(V, V)) * scale


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _speculate_chain(Lp, Lq, n_out, trials, k, point_mass=False, seed=0):
    """Run speculative sampling on the Markov target Lp with drafts from chain Lq, from token 0, until
    n_out tokens are emitted, `trials` times: counts of the emitted n_out-grams (V**n_out cells)."""
    V = Lp.shape[0]
    s = _sampler(vocab=V, seed=seed)
    Q = _softmax(Lq)
    counts = np.zeros(V ** n_out, np.int64)
    for _ in range(trials):
        out = [0]
        while len(out) <= n_out:
            prev, toks, qs = out[-1], [], []
            for _ in range(k):
                x = int(np.argmax(Q[prev])) if point_mass else draw(Q[prev], s.rng)
                toks.append(x)
                qs.append(Q[prev])
                prev = x
            rows = Lp[[out[-1]] + toks]            # row j: the target after draft j - 1 (row 0: out[-1])
            out += accept_draft(Draft(toks, None if point_mass else np.array(qs)), rows, s)
        counts[np.ravel_multi_index(out[1:n_out + 1], (V,) * n_out)] += 1
    return counts


def _chain_probs(Lp, n_out):
    P = _softmax(Lp)
    V = P.shape[0]
    probs = np.zeros((V,) * n_out)
    for idx in np.ndindex(*probs.shape):
        prev, pr = 0, 1.0
        for t in idx:
            pr *= P[prev, t]
            prev = t
        probs[idx] = pr
    return probs


@pytest.mark.parametrize("point_mass", [False, True])
def test_speculative_sampling_output_is_distributed_as_the_target(point_mass):
    """Three emitted tokens (125 cells) from the target chain through drafts of another chain, k = 3:
    rejections, residual draws and bonus tokens all occur; the joint distribution must be the target's."""
    Lp, Lq = _chain(1), _chain(2)
    counts = _speculate_chain(Lp, Lq, n_out=3, trials=12000, k=3, point_mass=point_mass, seed=11)
    stat, df, p = chi_square(counts, _chain_probs(Lp, 3))
    assert df >= 40 and p > P_MIN, (stat, df, p)


def test_the_chi_square_test_rejects_the_draft_distribution():
    """Control: the same test, sample size and threshold reject emitting the drafts unjudged (q's chain),
    so passing above is not for want of power."""
    Lp, Lq = _chain(1), _chain(2)
    rng = np.random.default_rng(3)
    Q, V = _softmax(Lq), 5
    counts = np.zeros(V ** 3, np.int64)
    for _ in range(12000):
        prev, idx = 0, []
        for _ in range(3):
            prev = draw(Q[prev], rng)
            idx.append(prev)
        counts[np.ravel_multi_index(idx, (V,) * 3)] += 1
    assert chi_square(counts, _chain_probs(Lp, 3))[2] < 1e-12
    # and a subtler error: accepting with probability p/q but resampling from p instead of p - q
    assert _wrong_residual_p_value(Lp, Lq) < P_MIN


def _wrong_residual_p_value(Lp, Lq) -> float:
    P, Q = _softmax(Lp), _softmax(Lq)
    rng = np.random.default_rng(5)
    counts = np.zeros(5, np.int64)
    for _ in range(12000):                      # one token after token 0: draft x ~ Q[0]
        x = draw(Q[0], rng)
        t = x if rng.random() < min(1, P[0, x] / Q[0, x]) else draw(P[0], rng)
        counts[t] += 1
    return chi_square(counts, P[0])[2]


def test_adaptive_k_follows_the_acceptance_rate():
    ak = AdaptiveK(k_max=8, k_min=1, min_gain=0.1, decay=0.9)
    assert ak.k(0) == 3                          # prior rate 1/2: 0.5^3 >= 0.1 > 0.5^4
    for _ in range(20):
        ak.update(0, ak.k(0), ak.k(0))          # everything accepted
    assert ak.k(0) == 8 and ak.rate(0) > 0.9
    for _ in range(20):
        ak.update(0, ak.k(0), 0)                 # nothing accepted
    assert ak.k(0) == 1 and ak.rate(0) < 0.25
    ak.update(1, 4, 2)
    assert ak.rate(1) == pytest.approx((2 + 1) / (3 + 2))   # 2 accepted, the 3rd rejected, 4th unseen
    ak.release(0)
    assert ak.k(0) == 3


def test_speculator_bookkeeping_and_stats():
    V = 6
    sp = Speculator(NgramProposer(), k_max=4, adaptive=False)
    s = Sampler(SamplingParams(temperature=0.0), V)
    toks = [1, 2, 3, 4, 1, 2]
    d = sp.draft(0, toks, s, limit=10)
    assert d.tokens == [3, 4, 1, 2]
    rows = np.eye(V, dtype=np.float32)[[3, 4, 5, 0, 0]]
    assert sp.verify(0, d.tokens[:3], rows[:4], s) == [3, 4, 5]      # the scheduler verified 3 of 4
    assert sp.draft(0, toks, s, limit=1).tokens == [3]                # limit caps k
    with pytest.raises(ValueError):
        sp.verify(0, [4], rows[:2], s)                                 # not what was drafted
    assert sp.verify(1, [], rows[:1], s) == [3]                       # a plain row: no stats
    st = sp.stats.as_dict()
    assert (st["spec_drafted"], st["spec_accepted"], st["spec_passes"]) == (3, 2, 1)
    assert st["spec_acceptance_rate"] == pytest.approx(2 / 3, abs=1e-4) and st["spec_tokens_per_pass"] == 3.0


class _TableModel:
    """A draft 'model' whose logits depend only on the last token: rows of a fixed table."""

    def __init__(self, table):
        self.table = np.asarray(table, np.float32)
        self.config = SimpleNamespace(vocab_size=self.table.shape[1])
        self.fed = []

    def new_cache(self, n_ctx):
        return SimpleNamespace(length=0, n_ctx=n_ctx, truncate=lambda n: None)

    def forward(self, ids, positions, cache, all_logits=False):
        self.fed.append((list(map(int, ids)), list(map(int, positions))))
        return self.table[[int(ids[-1])]]


def test_model_proposer_reuses_its_cache_and_pads_a_shorter_vocabulary():
    table = np.full((4, 4), -5.0)
    table[0, 1] = table[1, 2] = table[2, 3] = table[3, 0] = 5.0       # 0 -> 1 -> 2 -> 3 -> 0
    m = _TableModel(table)
    mp = ModelProposer(m, target_vocab=6, n_ctx=64)
    assert mp.propose(0, [3, 0], 3).tokens == [1, 2, 3]
    assert m.fed == [([3, 0], [0, 1]), ([1], [2]), ([2], [3])]
    m.fed.clear()
    assert mp.propose(0, [3, 0, 1, 2, 0], 2).tokens == [1, 2]         # 1 and 2 were accepted, 0 is new
    assert m.fed == [([0], [4]), ([1], [5])]                          # only the new token is fed
    s = _sampler(vocab=6, seed=3)
    d = mp.propose(1, [2], 4, s)
    assert d.q.shape == (4, 6) and (d.q[:, 4:] == 0).all() and np.allclose(d.q.sum(axis=1), 1)
    mp.release(0)
    assert 0 not in mp._states


def _tok(kind="bpe", tokens=("a", "b", "c", "d", "e", "f", "g"), bos=1, eos=2):
    return SimpleNamespace(kind=kind, bos_id=bos, eos_id=eos, add_bos=True, add_eos=False,
                           vocab_size=len(tokens), vocab=SimpleNamespace(tokens=list(tokens)))


def test_vocabulary_rule_is_llama_cpps():
    base = [f"t{i}" for i in range(300)]
    check_draft_vocab(_tok(tokens=base), _tok(tokens=base[:200]))            # 100 padding ids: fine
    check_draft_vocab(_tok(tokens=base), _tok(tokens=["x"] * 5 + base[5:]))  # ids below 5 not compared
    for draft, words in ((_tok(tokens=base[:150]), "150 tokens in the draft, 300"),
                         (_tok(tokens=base[:7] + ["zz"] + base[8:]), "token 7 is 'zz' in the draft, 't7'"),
                         (_tok(kind="spm", tokens=base), "tokenizer type"),
                         (_tok(tokens=base, eos=3), "eos_id is 3 in the draft, 2 in the target")):
        with pytest.raises(InvalidParameterError, match=words):
            check_draft_vocab(_tok(tokens=base), draft)
