"""The engine samples on the device when the model offers it (forward_step_sample with a device
sampler for the row), so only ids cross to the host; it falls back to host sampling from logits for
logprobs, logit bias and penalties, row by row within one step.

CPU tier: a numpy model wrapped with a forward_step_sample that records which rows it sampled and
draws their ids from the numpy sampler (the GPU's own sampler is tested against that twin in tests/gpu/)."""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.engine.params import SamplingParams
from aircupy.engine.sampler import Sampler
from tests.helpers.engines import numpy_engine, with_batching


class _DeviceSampler:
    def __init__(self, params, vocab):
        self.params = params
        p = params
        self.supported = (not p.logit_bias and p.repeat_penalty == 1.0 and p.presence_penalty == 0.0
                          and p.frequency_penalty == 0.0)
        self.host = Sampler(params, vocab)


class DeviceSamplingModel:
    """NumpyModel plus new_sampler and a forward_step_sample that samples the rows given a sampler,
    counting the rows sampled "on the device" and the rows handed back as logits."""

    def __init__(self, model):
        self.m = model
        self.rows = {"device": 0, "host": 0}

    def __getattr__(self, name):
        return getattr(self.m, name)

    def new_sampler(self, params):
        """The Model protocol: a sampler reporting .supported (as CudaModel's DeviceSampler)."""
        return _DeviceSampler(params, self.m.config.vocab_size)

    def forward_step_sample(self, arrays, kv, samplers):
        logits = self.m.forward_step(arrays, kv)
        ids = np.full(len(logits), -1, np.int32)
        for i, s in enumerate(samplers):
            if s is not None:
                ids[i] = s.host.sample(logits[i])
        self.rows["device"] += sum(s is not None for s in samplers)
        self.rows["host"] += sum(s is None for s in samplers)
        return ids, logits


@pytest.fixture(scope="module")
def engines(smollm2_path):
    """The shared numpy engine, and a sibling over the same weights whose model offers device
    sampling (its own runner and KV pool)."""
    host = numpy_engine(smollm2_path)
    dev = with_batching(host, model=DeviceSamplingModel(host.model))
    yield host, dev
    dev.close_runner()


PROMPT = "The capital of France is"


def test_greedy_uses_the_device_sampler_and_matches_host_sampling(engines):
    host, dev = engines
    a = host.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    dev.model.rows.update(device=0, host=0)
    b = dev.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    assert b.token_ids == a.token_ids and b.text == a.text and len(b.token_ids) == 8
    assert dev.model.rows == {"device": 8, "host": 0}        # no logits sampled on the host


def test_seeded_device_sampling_is_reproducible(engines):
    _, dev = engines
    runs = [dev.generate(PROMPT, max_tokens=6, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7,
                         ignore_eos=True).token_ids for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("override", [{"logprobs": 3}, {"repeat_penalty": 1.3}, {"logit_bias": {42: 2.0}}])
def test_host_sampling_when_the_device_cannot(engines, override):
    host, dev = engines
    dev.model.rows.update(device=0, host=0)
    r = dev.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, **override)
    ref = host.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, **override)
    assert dev.model.rows == {"device": 0, "host": 4}
    assert r.token_ids == ref.token_ids


def test_device_and_host_rows_in_one_step(engines):
    """Two requests batched together: one sampled on the device, one (logprobs) on the host; each
    gets what it gets alone."""
    host, dev = engines
    dev.model.rows.update(device=0, host=0)
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    a, b = dev.generate_batch([PROMPT, "Once upon a time"], [greedy, greedy.with_overrides(logprobs=1)])
    assert dev.model.rows == {"device": 5, "host": 5}
    assert a.token_ids == host.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True).token_ids
    assert b.token_ids == host.generate("Once upon a time", max_tokens=5, temperature=0, ignore_eos=True).token_ids
    assert [lp.token_id for lp in b.logprobs] == b.token_ids
