"""Speculative decoding through the Engine (engine/runner.py, engine/spec_setup.py) on the real SmolLM2,
numpy backend.

Exactness: at temperature 0, the ids (and logprobs, within the row-grouping noise) of several prompts
decoded together equal those of the same engine without speculation, for prompt lookup and self-draft
and a draft GGUF (the target's first 8 layers). A seeded sampled run reproduces itself.
The stop logic cuts a verification chunk's tokens: an oracle proposer (it drafts the baseline's own
continuation, so every draft is accepted and chunks are long) must give exactly the baseline's result
under a stop string and max_tokens, with tokens verified past the cut, and every KV block back after.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from click.testing import CliRunner

from aircupy import Engine
from aircupy.cli import main
from aircupy.engine.params import SamplingParams
from aircupy.engine.spec_setup import (
    SpecSetup,
    build_speculator,
    check_spec_args,
    default_skip_layers,
)
from aircupy.engine.speculative import Draft, Speculator
from aircupy.errors import InvalidParameterError
from aircupy.server.metrics import Metrics
from tests.helpers.engines import numpy_engine
from tests.helpers.spec_drive import truncated_gguf

N_TOKENS = 32
N_CTX = 256
LOGPROB_TOL = 1e-3
TEXTS = (
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    ("def total(items):\n    x = 0\n    for item in items:\n        x += item.price\n    return x\n\n"
     "# the same function with x renamed to count\ndef total(items):\n"),
    "Once upon a time",
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def base(smollm2_path):
    return numpy_engine(smollm2_path, N_CTX)


@pytest.fixture(scope="module")
def baseline(base):
    return base.generate_batch(list(TEXTS), GREEDY)


def idle(engine) -> dict:
    st = engine.stats()
    assert st["busy"] == 0 and st["kv_blocks_used"] == 0, st
    return st


def check_same(out, ref) -> None:
    for o, r in zip(out, ref):
        assert o.token_ids == r.token_ids
        assert o.text == r.text and o.finish_reason == r.finish_reason
        lp, lr = np.array([t.logprob for t in o.logprobs]), np.array([t.logprob for t in r.logprobs])
        assert np.abs(lp - lr).max() < LOGPROB_TOL


@pytest.mark.parametrize("source", ["ngram", "self"])
def test_greedy_ids_equal_without_speculation(smollm2_path, baseline, source):
    with Engine(smollm2_path, backend="numpy", n_ctx=N_CTX, kv_cache_tokens=4 * N_CTX, speculative=source) as e:
        out = e.generate_batch(list(TEXTS), GREEDY)          # three sequences in each step
        st = idle(e)
    check_same(out, baseline)
    assert st["speculative"] == source
    assert 0 < st["spec_accepted"] < st["spec_drafted"]    # acceptances and rejections both ran
    assert st["spec_tokens_per_pass"] > 1.0
    assert st["completion_tokens"] == len(TEXTS) * N_TOKENS


def test_greedy_ids_equal_with_a_draft_gguf(smollm2_path, baseline, tmp_path):
    draft = truncated_gguf(smollm2_path, tmp_path / "draft.gguf", 8)
    with Engine(smollm2_path, backend="numpy", n_ctx=N_CTX, kv_cache_tokens=4 * N_CTX, speculative="draft",
                draft_model=draft, draft_k=4) as e:
        out = e.generate_batch(list(TEXTS), GREEDY)
        st = idle(e)
    check_same(out, baseline)
    assert st["spec_drafted"] > 0 and st["speculative"] == "draft"


def sibling(engine, speculator):
    """A second Engine over engine's loaded model with its own runner, speculating with `speculator`."""
    e = copy.copy(engine)
    e._spec = SpecSetup("test", speculator)
    e._start_runner()
    return e


def test_seeded_sampling_reproduces(base):
    params = SamplingParams(temperature=0.9, top_k=40, max_tokens=24, seed=7, ignore_eos=True)
    runs = []
    for _ in range(2):
        e = sibling(base, build_speculator("self", model=base.model, tokenizer=base.tokenizer, backend="numpy",
                                           n_ctx=N_CTX, draft_k=4).speculator)
        try:
            runs.append([r.token_ids for r in e.generate_batch(list(TEXTS[:2]), params)])
            assert e.stats()["spec_drafted"] > 0
        finally:
            e._finalizer()
    assert runs[0] == runs[1] and all(len(ids) == 24 for ids in runs[0])


class Oracle:
    """Drafts the continuation a baseline generated for the prompt the sequence starts with."""

    def __init__(self, refs):
        self.refs = refs           # (prompt ids, generated ids)

    def propose(self, seq_id, token_ids, k, sampler=None) -> Draft:
        toks = list(token_ids)
        for prompt, gen in self.refs:
            if toks[:len(prompt)] == prompt:
                n = len(toks) - len(prompt)
                return Draft(gen[n:n + k])
        return Draft()

    def release(self, seq_id) -> None:
        pass


class Recording(Speculator):
    """A Speculator that remembers how many tokens each verification gave."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.verified: list[int] = []

    def verify(self, seq_id, scheduled, logits, sampler):
        ids = super().verify(seq_id, scheduled, logits, sampler)
        self.verified.append(len(ids))
        return ids


def test_stop_string_and_max_tokens_cut_a_verified_chunk(base, baseline):
    refs = [(r.prompt_token_ids, r.token_ids) for r in baseline]
    text = baseline[0].text
    stop = text[len(text) // 3:len(text) // 3 + 6]           # a stop string a third of the way in
    cases = [GREEDY.with_overrides(stop=[stop]), GREEDY.with_overrides(max_tokens=11)]
    for params in cases:
        want = base.generate_batch(list(TEXTS), params)
        spec = Recording(Oracle(refs), k_max=8, adaptive=False)
        e = sibling(base, spec)
        try:
            got = e.generate_batch(list(TEXTS), params)
            st = idle(e)
        finally:
            e._finalizer()
        check_same(got, want)
        assert st["spec_accepted"] == st["spec_drafted"] > 0          # the oracle is always right
        assert max(spec.verified) == 9                                # 8 drafts + the bonus token
        if params.stop:
            assert got[0].finish_reason == "stop" and got[0].stop_string == stop
            assert sum(spec.verified) > sum(len(r.token_ids) for r in got)   # verified tokens were cut
        else:
            assert [len(r.token_ids) for r in got] == [11] * len(TEXTS)


def test_constrained_request_runs_undrafted_beside_drafted_ones(base):
    e = sibling(base, build_speculator("ngram", model=base.model, tokenizer=base.tokenizer, backend="numpy",
                                       n_ctx=N_CTX).speculator)
    try:
        ps = [GREEDY.with_overrides(regex="[0-9]{3}-[a-z]{4}"), GREEDY]
        got = e.generate_batch([TEXTS[2], TEXTS[0]], ps)
        st = idle(e)
    finally:
        e._finalizer()
    want = base.generate_batch([TEXTS[2], TEXTS[0]], ps)
    check_same(got, want)
    assert st["spec_drafted"] > 0


def test_metrics_export_the_speculative_counters(base):
    stats = {"speculative": "ngram", "spec_drafted": 10, "spec_accepted": 4, "spec_passes": 3,
             "spec_acceptance_rate": 0.4, "spec_tokens_per_pass": 2.33}
    text = Metrics().render(0, lambda: stats)
    assert "aircupy_spec_draft_tokens_total 10" in text
    assert "aircupy_spec_accepted_tokens_total 4" in text
    assert "aircupy_spec_acceptance_rate 0.4" in text
    assert "aircupy_spec_tokens_per_pass 2.33" in text


def test_bad_arguments_are_clear_errors(tmp_path, base, gemma3_path):
    with pytest.raises(InvalidParameterError, match="speculative: must be one of ngram, draft, self"):
        check_spec_args("lookup", None, None)
    with pytest.raises(InvalidParameterError, match="needs a draft model"):
        check_spec_args("draft", None, None)
    with pytest.raises(InvalidParameterError, match="draft_k: must be an integer"):
        check_spec_args("ngram", None, 0)
    with pytest.raises(InvalidParameterError, match="draft_model: .*no such file"):
        check_spec_args("draft", tmp_path / "missing.gguf", None)
    with pytest.raises(InvalidParameterError, match="vocabulary does not match the target's: tokenizer type 'spm', the target's is 'bpe'"):
        build_speculator("draft", model=base.model, tokenizer=base.tokenizer, backend="numpy", n_ctx=N_CTX,
                         draft_model=gemma3_path)

    class NoView:                                  # a backend's model without draft_view (CUDA's today)
        config = base.config
    with pytest.raises(InvalidParameterError, match="'self' needs a model that can skip layers"):
        build_speculator("self", model=NoView(), tokenizer=base.tokenizer, backend="cuda", n_ctx=N_CTX)
    assert default_skip_layers(30) == list(range(15, 29, 2))


def test_cli_flags(smollm2_path, tmp_path):
    r = CliRunner().invoke(main, ["generate", "--backend", "numpy", "-m", str(smollm2_path), "--speculative",
                                  "draft", "--draft-model", str(tmp_path / "nope.gguf"), "hi"])
    assert r.exit_code == 2 and "draft_model" in r.output and "no such file" in r.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    r = CliRunner().invoke(main, ["serve", "-m", str(smollm2_path), "--backend", "numpy", "--no-auth",
                                  "--speculative", "draft", "--draft-model", str(bad)])
    assert r.exit_code == 2 and "cannot be read as a GGUF model" in r.output
    r = CliRunner().invoke(main, ["generate", "--backend", "numpy", "-m", str(smollm2_path), "--n-ctx", "256",
                                  "-n", "12", "-t", "0", "--speculative", "ngram", "--draft-k", "4", "--stats",
                                  TEXTS[0]])
    assert r.exit_code == 0, r.output
    assert "[speculative] ngram:" in r.output
