"""Sampler and SamplingParams in isolation: pure numpy, no model."""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.engine.params import SamplingParams, parse_size
from aircupy.engine.sampler import Sampler, token_logprobs
from aircupy.errors import InvalidParameterError


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, size=1000).astype(np.float32)


# -- SamplingParams ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("min_p", -0.01), ("min_p", 1.01), ("max_tokens", 0), ("max_tokens", 2.5),
    ("repeat_penalty", 0.0), ("repeat_last_n", -2), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("seed", -1), ("logprobs", -1), ("stop", [""]), ("stop", [3]),
    ("logit_bias", {5: 101}), ("logit_bias", {"x": 1.0}), ("logit_bias", {-1: 1.0}), ("ignore_eos", 1),
])
def test_invalid_params_name_the_parameter(field, value):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_params_normalise_forgiving_forms():
    p = SamplingParams(stop="###", logit_bias={"7": -5})
    assert p.stop == ("###",) and p.logit_bias == {7: -5}
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(temperature=0).greedy


def test_overrides_and_cli_options():
    p = SamplingParams.from_options(temperature=None, top_k=5, seed=None)
    assert p.top_k == 5 and p.temperature == SamplingParams().temperature and p.seed is None
    assert p.with_overrides(max_tokens=3).max_tokens == 3
    with pytest.raises(InvalidParameterError) as e:
        p.with_overrides(temprature=1.0)
    assert e.value.param == "temprature"
    with pytest.raises(InvalidParameterError):
        p.with_overrides(top_p=2.0)  # replace() validates again


def test_vocab_checks_happen_in_the_sampler():
    with pytest.raises(InvalidParameterError) as e:
        Sampler(SamplingParams(logit_bias={1000: 1.0}), vocab_size=1000)
    assert e.value.param == "logit_bias"
    with pytest.raises(InvalidParameterError):
        Sampler(SamplingParams(logprobs=1001), vocab_size=1000)


@pytest.mark.parametrize("text, n", [
    ("4GiB", 4 << 30), ("4G", 4 << 30), ("500MB", 500_000_000), ("1.5 GiB", 3 << 29),
    ("512mib", 512 << 20), ("123", 123), (2048, 2048), ("2kB", 2000),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "4GX", "-1GiB", "0", 0, "4iB", "GiB", True, 1.5])
def test_parse_size_rejects(bad):
    with pytest.raises(InvalidParameterError) as e:
        parse_size(bad)
    assert e.value.param == "vram_budget"


# -- greedy and logit processing --------------------------------------------------------------------
def test_greedy_is_argmax_lowest_id_on_ties(logits):
    s = Sampler(SamplingParams(temperature=0), len(logits))
    assert s.sample(logits) == int(np.argmax(logits))
    tied = np.zeros(10, np.float32)
    tied[[3, 7]] = 1.0
    assert Sampler(SamplingParams(temperature=0), 10).sample(tied[None, :]) == 3


def test_logit_bias_steers_greedy(logits):
    target = int(np.argmin(logits))
    s = Sampler(SamplingParams(temperature=0, logit_bias={target: 100}), len(logits))
    assert s.sample(logits) == target


def test_repetition_penalty_over_recent_window():
    x = np.array([2.0, -2.0, 2.0, -2.0, 1.0], np.float32)
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=3), 5, prompt_ids=[2, 0, 1, 0])
    out = s.process(x)  # window = last 3 tokens = {0, 1}: token 2 fell out of it
    np.testing.assert_allclose(out, [1.0, -4.0, 2.0, -2.0, 1.0])
    s_all = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=-1), 5, prompt_ids=[2, 0, 1, 0])
    np.testing.assert_allclose(s_all.process(x), [1.0, -4.0, 1.0, -2.0, 1.0])


def test_presence_and_frequency_only_over_generated_tokens():
    x = np.zeros(6, np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 6, prompt_ids=[4, 4, 4])
    for t in (1, 1, 2):
        s.accept(t)
    np.testing.assert_allclose(s.process(x), [0, -1.0, -0.75, 0, 0, 0])


def test_logits_of_the_wrong_size_are_a_bug():
    with pytest.raises(ValueError):
        Sampler(SamplingParams(temperature=0), 10).sample(np.zeros(11, np.float32))


# -- truncation -------------------------------------------------------------------------------------
def brute_candidates(x, temperature, top_k, top_p, min_p):
    """The candidate set computed the slow obvious way: full sort, cut by cut."""
    z = x.astype(np.float64) / temperature
    order = np.lexsort((np.arange(len(z)), -z))
    if top_k:
        order = order[:top_k]
    p = softmax(z[order])
    n = len(order)
    if top_p < 1:
        c = np.cumsum(p)
        n = min(n, int(np.argmax(c >= top_p - 1e-12)) + 1 if (c >= top_p - 1e-12).any() else n)
    if min_p > 0:
        n = min(n, int((p >= min_p * p[0]).sum()))
    return order[:n]


@pytest.mark.parametrize("t, k, p, m", [
    (1.0, 40, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 50, 0.8, 0.05), (1.0, 0, 1.0, 0.1),
    (0.8, 40, 0.95, 0.05), (2.0, 0, 0.5, 0.2),
])
def test_candidates_match_brute_force(logits, t, k, p, m):
    s = Sampler(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m), len(logits))
    ids, probs = s.candidates(logits)
    np.testing.assert_array_equal(ids, brute_candidates(logits, t, k, p, m))
    assert np.all(np.diff(probs) <= 0)


def test_top_p_alone_on_a_large_flat_vocabulary():
    # A near-flat 262k vocabulary makes the nucleus thousands of tokens wide: the growing partial sort
    # must go several rounds and still find exactly the brute-force prefix.
    x = np.random.default_rng(1).normal(0, 0.3, size=262_144).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0), len(x))
    ids, _ = s.candidates(x)
    assert len(ids) > 1000
    np.testing.assert_array_equal(ids, brute_candidates(x, 1.0, 0, 0.5, 0.0))


def test_top_p_is_relative_to_the_whole_vocabulary_not_the_first_round():
    # 256 strong ids hold ~93% of the mass, 19,744 weak ones the rest: the first partial round already
    # reaches top_p=0.9, and the cut must still be at 90% of the total, not of that round's mass.
    x = np.zeros(20_000, np.float32)
    x[:256] = np.linspace(8, 4, 256)
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0), len(x))
    ids, probs = s.candidates(x)
    np.testing.assert_array_equal(ids, brute_candidates(x, 1.0, 0, 0.9, 0.0))
    assert probs.sum() / np.exp(x - x.max()).sum() >= 0.9


def test_top_k_one_is_greedy_at_any_temperature(logits):
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=3), len(logits))
    assert {s.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}


# -- drawing ----------------------------------------------------------------------------------------
def test_seed_reproduces_and_different_seeds_differ():
    x = np.zeros(500, np.float32)  # flat: any difference in the stream shows

    def draw(seed):
        s = Sampler(SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0, seed=seed), 500)
        return [s.sample(x) for _ in range(30)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


@pytest.mark.parametrize("t, k, p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.7)])
def test_draws_follow_the_target_distribution(t, k, p):
    x = np.array([2.0, 1.5, 1.0, 0.0, -1.0, -3.0], np.float32)
    s = Sampler(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=0.0, seed=7), len(x))
    n = 20_000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=len(x))
    ids = brute_candidates(x, t, k, p, 0.0)
    target = np.zeros(len(x))
    target[ids] = softmax(x[ids].astype(np.float64) / t)
    assert counts[target == 0].sum() == 0
    # 5 standard deviations of a binomial count: fails by chance with probability ~1e-6
    sd = np.sqrt(n * target * (1 - target))
    assert np.all(np.abs(counts - n * target) <= 5 * sd + 1)


# -- logprobs ---------------------------------------------------------------------------------------
def test_token_logprobs_are_the_raw_log_softmax(logits):
    chosen = 17
    lp, top = token_logprobs(logits, chosen, 5)
    ref = np.log(softmax(logits.astype(np.float64)))
    assert lp == pytest.approx(ref[chosen], abs=1e-9)
    assert [i for i, _ in top] == list(np.argsort(-ref, kind="stable")[:5])
    vals = [v for _, v in top]
    assert vals == sorted(vals, reverse=True) and np.exp(vals).sum() <= 1.0
    assert token_logprobs(logits, chosen, 0)[1] == []
