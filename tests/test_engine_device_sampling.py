"""The engine samples on the device when the model offers it (CudaModel.forward_sample), so only ids
cross to the host; it falls back to host sampling from logits for logprobs, logit bias and penalties.

CPU tier: a numpy model wrapped with a forward_sample that records its calls and draws the id from
the numpy sampler (the GPU's own sampler is tested against that twin in tests/gpu/)."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

from aircupy.engine.request import KVState
from aircupy.engine.sampler import Sampler
from tests.helpers.engines import numpy_engine


class _DeviceSampler:
    def __init__(self, params, vocab):
        self.params = params
        p = params
        self.supported = (not p.logit_bias and p.repeat_penalty == 1.0 and p.presence_penalty == 0.0
                          and p.frequency_penalty == 0.0)
        self.host = Sampler(params, vocab)


class DeviceSamplingModel:
    """NumpyModel plus new_sampler/forward_sample, counting which entry point each step used."""

    def __init__(self, model):
        self.m = model
        self.calls = {"forward": 0, "forward_sample": 0}

    def __getattr__(self, name):
        return getattr(self.m, name)

    def forward(self, ids, pos, cache, all_logits=False):
        self.calls["forward"] += 1
        return self.m.forward(ids, pos, cache, all_logits)

    def new_sampler(self, params):
        """The Model protocol: None where the parameters need the host sampler (as CudaModel)."""
        s = _DeviceSampler(params, self.m.config.vocab_size)
        return s if s.supported else None

    def forward_sample(self, ids, pos, cache, sampler):
        self.calls["forward_sample"] += 1
        return int(sampler.host.sample(self.m.forward(ids, pos, cache)[-1]))


@pytest.fixture(scope="module")
def engines(smollm2_path):
    """The shared numpy engine, and a shallow copy of it whose model offers device sampling (same
    tokenizer, config and weights; its own KV cache and lock)."""
    host = numpy_engine(smollm2_path)
    dev = copy.copy(host)
    dev.model = DeviceSamplingModel(host.model)
    dev._kv = KVState(dev.model, host.n_ctx)
    dev._lock = threading.Lock()
    return host, dev


PROMPT = "The capital of France is"


def test_greedy_uses_the_device_sampler_and_matches_host_sampling(engines):
    host, dev = engines
    a = host.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    dev.reset_cache()
    dev.model.calls.update(forward=0, forward_sample=0)
    b = dev.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    assert b.token_ids == a.token_ids and b.text == a.text and len(b.token_ids) == 8
    assert dev.model.calls["forward"] == 0                       # no logits crossed to the host
    assert dev.model.calls["forward_sample"] == len(b.token_ids)  # prompt + 7 fed-back tokens


def test_seeded_device_sampling_is_reproducible(engines):
    _, dev = engines
    runs = [dev.generate(PROMPT, max_tokens=6, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7,
                         ignore_eos=True).token_ids for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("override", [{"logprobs": 3}, {"repeat_penalty": 1.3}, {"logit_bias": {42: 2.0}}])
def test_host_sampling_when_the_device_cannot(engines, override):
    host, dev = engines
    dev.reset_cache()
    dev.model.calls.update(forward=0, forward_sample=0)
    r = dev.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, **override)
    ref = host.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, **override)
    assert dev.model.calls["forward_sample"] == 0 and dev.model.calls["forward"] == 4
    assert r.token_ids == ref.token_ids
