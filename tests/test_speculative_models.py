"""Speculative decoding end to end through the real Scheduler + BlockManager and NumpyModel.forward_step
(tests/helpers/spec_drive.py, the loop a runner runs):

- exactness at temperature 0 on the real SmolLM2 and Gemma3: for each draft source (prompt lookup, a
  draft GGUF -- the target's first layers, same vocabulary --, and self-draft with layers skipped),
  the generated ids equal those of the same prompts generated without speculation, 32 tokens each, in
  one batch (verification chunks next to other sequences' rows). Every greedy choice of the run
  without speculation has a top-2 margin far above the float32 noise of a different row grouping
  (asserted), so equality is what the algorithm guarantees, not luck.
- with sampling, on a tiny synthetic model: the distribution of the second generated token (which is
  an accepted draft, a residual draw or a bonus token) equals the target's exact marginal, chi-square
  over 2000 seeded sequences; and a seeded run reproduces.
- llama.cpp's vocabulary rule on the real tokenizers.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.engine.drafters import (
    ModelProposer,
    NgramProposer,
    check_draft_vocab,
    self_draft,
)
from aircupy.engine.params import SamplingParams
from aircupy.engine.speculative import Speculator
from aircupy.errors import InvalidParameterError
from aircupy.gguf.reader import GGUFFile
from aircupy.gguf.tokenizer import Tokenizer
from aircupy.reference.model import NumpyModel
from tests.helpers.chi2 import chi_square
from tests.helpers.spec_drive import generate, min_margin, truncated_gguf
from tests.helpers.tiny_models import TINY, write_tiny_model

N_TOKENS = 32
MARGIN = 1e-4       # relative top-2 gap of every greedy choice; row-grouping noise is ~1e-6 (test_forward_step)
TEXTS = (
    ("Rename the variable x to count in this code.\n\ndef total(items):\n    x = 0\n    for item in items:\n"
     "        x += item.price * item.quantity\n    return x\n\nRenamed:\n\ndef total(items):\n"),
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
)
# (layers of the draft GGUF, layers the self-draft skips) per model
DRAFTS = {"smollm2": (8, range(15, 28, 2)), "gemma3": (12, range(10, 15, 2))}


def _load(path):
    g = GGUFFile(path)
    return NumpyModel(g, ModelConfig.from_gguf(g)), Tokenizer.from_gguf(g)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request, tmp_path_factory):
    """The model, its prompts, its generation without speculation, and its draft GGUF."""
    path = request.getfixturevalue(f"{request.param}_path")
    model, tok = _load(path)
    prompts = [tok.encode(t) for t in TEXTS]
    base = generate(model, prompts, N_TOKENS)
    margins = [min_margin(r) for r in base.rows]
    print(f"\n{request.param}: min top-2 margins {[f'{m:.1e}' for m in margins]}")
    assert min(margins) > MARGIN
    n_draft, skip = DRAFTS[request.param]
    draft_path = truncated_gguf(path, tmp_path_factory.mktemp("draft") / "draft.gguf", n_draft)
    return request.param, model, tok, prompts, base, draft_path, list(skip)


@pytest.mark.parametrize("source", ["ngram", "draft", "self"])
def test_greedy_speculation_generates_exactly_the_same_ids(real, source):
    name, model, tok, prompts, base, draft_path, skip = real
    if source == "ngram":
        proposer = NgramProposer(n_max=3, n_min=1)
    elif source == "draft":
        draft, draft_tok = _load(draft_path)
        check_draft_vocab(tok, draft_tok)
        proposer = ModelProposer(draft, model.config.vocab_size, n_ctx=256)
    else:
        proposer = self_draft(model, skip, n_ctx=256)
    sp = Speculator(proposer, k_max=6)
    out = generate(model, prompts, N_TOKENS, speculator=sp)
    st = sp.stats.as_dict()
    print(f"{name} {source}: {out.passes} passes for {N_TOKENS} tokens (without: {base.passes}); {st}")
    assert out.tokens == base.tokens
    assert st["spec_drafted"] > 0 and out.sched.stats()["draft_tokens"] == st["spec_drafted"]
    assert out.sched.stats()["accepted_draft_tokens"] == st["spec_accepted"]
    assert 0 < st["spec_accepted"] < st["spec_drafted"]       # acceptances and rejections both ran


def test_real_vocabularies_are_checked_like_llama_cpp(smollm2_path, gemma3_path):
    smol = GGUFFile(smollm2_path)
    target = Tokenizer.from_gguf(smol)
    check_draft_vocab(target, target)
    with pytest.raises(InvalidParameterError, match="tokenizer type 'spm'"):
        check_draft_vocab(target, Tokenizer.from_gguf(GGUFFile(gemma3_path)))
    md = dict(smol.metadata)
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[1000], tokens[1001] = tokens[1001], tokens[1000]
    other = Tokenizer.from_metadata({**md, "tokenizer.ggml.tokens": tokens})
    with pytest.raises(InvalidParameterError, match=f"token 1000 is {tokens[1000]!r} in the draft"):
        check_draft_vocab(target, other)
    md_pad = {**md, "tokenizer.ggml.tokens": list(md["tokenizer.ggml.tokens"]) + [f"<pad{i}>" for i in range(64)]}
    for k in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if k in md:
            md_pad[k] = np.concatenate([np.asarray(md[k]), np.asarray(md[k])[:64]])
    check_draft_vocab(Tokenizer.from_metadata(md_pad), target)      # a target padded by 64 ids: accepted


TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A 3-layer target and a 1-layer draft of another seed, untied heads, 24 ids: distributions far
    from flat and far from each other (acceptance ~0.5), few enough ids for exact marginals."""
    d = tmp_path_factory.mktemp("tiny")
    spec = replace(TINY["llama"], tied=False, vocab=24)
    target = NumpyModel(*_open(write_tiny_model(d / "t.gguf", spec)))
    draft = NumpyModel(*_open(write_tiny_model(d / "d.gguf", replace(spec, n_layers=1, seed=9))))
    return target, draft


def _open(path):
    g = GGUFFile(path)
    return g, ModelConfig.from_gguf(g)


def _p(logits):
    x = np.asarray(logits, np.float64) / TEMPERATURE
    e = np.exp(x - x.max())
    return e / e.sum()


def _exact_marginals(model, prompt):
    """P(2nd generated token = y) and P(3rd = z), (V,) each, by enumerating the first two tokens."""
    V, n = model.config.vocab_size, len(prompt)
    c = model.new_cache(n + 3)
    p1 = _p(model.forward(np.array(prompt), np.arange(n), c)[0])
    m2, m3 = np.zeros(V), np.zeros(V)
    for x in range(V):
        c.truncate(n)
        p2 = _p(model.forward(np.array([x]), np.array([n]), c)[0])
        m2 += p1[x] * p2
        for y in range(V):
            c.truncate(n + 1)
            m3 += p1[x] * p2[y] * _p(model.forward(np.array([y]), np.array([n + 1]), c)[0])
    return m2, m3


def _sample(target, draft, prompt, n_seqs, n_tokens, k_max, adaptive):
    params = SamplingParams(temperature=TEMPERATURE, top_k=0, top_p=1.0, min_p=0.0)
    sp = Speculator(ModelProposer(draft, target.config.vocab_size, n_ctx=32), k_max=k_max, adaptive=adaptive)
    out = generate(target, [prompt] * n_seqs, n_tokens, speculator=sp, params=params, seeds=range(n_seqs),
                   num_blocks=2048, block_size=4, max_batched_tokens=1024, max_num_seqs=256)
    return out.tokens, sp.stats.as_dict()


def test_sampled_speculation_keeps_the_targets_distribution(tiny_pair):
    """4 tokens per sequence, k = 2: the 2nd token is an accepted draft or a residual draw, the 3rd also
    a bonus token; their marginals over 1500 seeded sequences against the exact ones."""
    target, draft = tiny_pair
    prompt = [5, 17, 12, 8]
    toks, st = _sample(target, draft, prompt, 1500, 4, k_max=2, adaptive=False)
    assert 0.2 < st["spec_acceptance_rate"] < 0.8, st               # accepts and rejects both frequent
    m2, m3 = _exact_marginals(target, prompt)
    for i, m in ((1, m2), (2, m3)):
        counts = np.bincount([t[i] for t in toks], minlength=target.config.vocab_size)
        stat, df, p = chi_square(counts, m)
        print(f"\ntoken {i + 1}: chi2 {stat:.1f}, df {df}, p {p:.3f}; {st}")
        assert df >= 10 and p > 1e-3
    # the same test rejects the draft model's own distribution (the test has the power to see an error)
    plain = generate(draft, [prompt] * 1500, 2, params=SamplingParams(temperature=TEMPERATURE, top_k=0, top_p=1.0,
                     min_p=0.0), seeds=range(1500), num_blocks=2048, block_size=4, max_batched_tokens=1024,
                     max_num_seqs=256).tokens
    assert chi_square(np.bincount([t[1] for t in plain], minlength=24), m2)[2] < 1e-6


def test_seeded_speculative_sampling_reproduces(tiny_pair):
    target, draft = tiny_pair
    runs = [_sample(target, draft, [5, 17, 12, 8], 40, 8, k_max=4, adaptive=True)[0] for _ in range(2)]
    assert runs[0] == runs[1] and len({tuple(t) for t in runs[0]}) > 20
