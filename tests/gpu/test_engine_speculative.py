"""GPU tier: speculative decoding through the Engine over the CUDA model on the real SmolLM2.

Greedy ids with speculation (prompt lookup; a draft GGUF of the target's first 8 layers, loaded on the
GPU too) equal those of the same engine without it, up to a divergence only where the run without
speculation has a top-2 margin within twice the tolerance (a verification chunk's rows are computed in
another grouping than one decode row: tests/gpu/test_batch_steps.py bounds the difference); "self" is
refused on CUDA (no draft_view yet). Every KV block is back after.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

N_TOKENS = 32
LOGPROB_TOL = 0.05
PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
           "def fibonacci(n):", "1, 2, 3, 4, 5, 6, 7, 8,"]


def _greedy():
    from aircupy.engine.params import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=2)


def _agree(ref, got):
    n = 0
    while n < len(ref.token_ids) and ref.token_ids[n] == got.token_ids[n]:
        n += 1
    for a, b in zip(ref.logprobs[:n], got.logprobs[:n]):
        assert abs(a.logprob - b.logprob) <= LOGPROB_TOL
    if n < len(ref.token_ids):
        (_, _, lp0), (id1, _, lp1) = ref.logprobs[n].top[:2]
        assert got.token_ids[n] == id1 and lp0 - lp1 <= 2 * LOGPROB_TOL, (n, ref.token_ids, got.token_ids)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from aircupy import Engine
    with Engine(smollm2_path, backend="cuda", n_ctx=512, max_num_seqs=8) as e:
        return e.generate_batch(PROMPTS, _greedy())


@pytest.mark.parametrize("source", ["ngram", "draft"])
def test_greedy_speculation_on_cuda(smollm2_path, reference, source, tmp_path):
    from aircupy import Engine
    from tests.helpers.spec_drive import truncated_gguf
    kw = {"draft_model": truncated_gguf(smollm2_path, tmp_path / "draft.gguf", 8)} if source == "draft" else {}
    with Engine(smollm2_path, backend="cuda", n_ctx=512, max_num_seqs=8, speculative=source, **kw) as e:
        out = e.generate_batch(PROMPTS, _greedy())
        st = e.stats()
    for r, o in zip(reference, out):
        _agree(r, o)
    assert st["spec_drafted"] > 0 and st["spec_accepted"] > 0
    assert st["kv_blocks_used"] == 0


def test_self_draft_is_refused_on_cuda(smollm2_path):
    from aircupy import Engine
    from aircupy.errors import InvalidParameterError
    with pytest.raises(InvalidParameterError, match="'self' needs a model that can skip layers"):
        Engine(smollm2_path, backend="cuda", n_ctx=512, speculative="self")
