"""GPU tier: the real SmolLM2 with its layers streamed, through the paths users and the benchmarks take.

- forward_sample (device sampling, the path bench_streaming times): 16 greedy ids at a budget that
  streams about half the layers equal the resident model's.
- the Engine over a streamed model (vram_budget below the resident pool): a greedy generation equals
  the numpy backend's.
- the server over that Engine, driven through its ASGI interface (tests/helpers/asgi_client.py: the
  GPU host has neither uvicorn nor httpx): one greedy chat completion equals the numpy Engine's.
A streamed pass runs the same kernels as a resident one (test_streaming.py holds the logits bit for
bit), so the ids must be equal, not merely close. Every test name says smollm2 (device_session.sh
selects the tests that need the real file with -k smollm2).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

N_CTX = 256
STEPS = 16
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def lib():
    from aircupy.cuda.kernels import KernelLibrary
    lib = KernelLibrary()
    lib.warmup()              # the CUDA context exists from here on: budgets below exclude it
    return lib


@pytest.fixture(scope="module")
def smollm2_file(smollm2_path):
    from aircupy.config import ModelConfig
    from aircupy.gguf.reader import GGUFFile
    g = GGUFFile(smollm2_path)
    yield g, ModelConfig.from_gguf(g)
    g.close()


def _half_pool(g, c, n_ctx=N_CTX):
    """The pool of half the layers resident and the rest streamed through 3 slots (KV in VRAM), as
    the planner spreads them: a budget at which the model must stream."""
    from aircupy.cuda.placement import PREFILL_ROWS, Footprint, resident_set
    fp = Footprint.of(g, c, n_ctx, PREFILL_ROWS)
    return fp.pool_plan(resident_set(c.n_layers, c.n_layers // 2), False, 3).total


def _greedy_ids(model, prompt, steps=STEPS):
    """Prefill `prompt` with device sampling (the first id), then steps - 1 single-token steps."""
    from aircupy.engine.params import SamplingParams
    cache = model.new_cache(N_CTX)
    sampler = model.new_sampler(SamplingParams(temperature=0.0))
    ids = [model.forward_sample(np.asarray(prompt, np.int32), np.arange(len(prompt), dtype=np.int32),
                                cache, sampler)]
    for _ in range(steps - 1):
        ids.append(model.forward_sample([ids[-1]], [cache.length], cache, sampler))
    return ids


def test_smollm2_streamed_forward_sample_equals_resident(smollm2_file, lib):
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions
    from aircupy.gguf.tokenizer import Tokenizer
    g, c = smollm2_file
    prompt = Tokenizer.from_gguf(g).encode(
        "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n")
    resident = CudaModel(g, c, N_CTX, lib=lib)
    want = _greedy_ids(resident, prompt)
    assert resident.stats()["streamed_layers"] == 0
    resident.close()
    del resident
    budget = _half_pool(g, c)
    # outside_bytes=0: the budget is the pool's alone (the context exists already; test_budget.py
    # holds the whole process to its budget in fresh processes)
    m = CudaModel(g, c, N_CTX, vram_budget=budget, lib=lib, options=CudaOptions(outside_bytes=0))
    try:
        st0 = m.stats()
        assert 0 < st0["streamed_layers"] < c.n_layers and st0["pool_bytes"] <= budget
        got = _greedy_ids(m, prompt)
        st = m.stats()
        assert got == want, f"streamed {got} != resident {want}"
        assert st["bytes_streamed"] > 0 and st["passes"] >= STEPS   # every step streamed its layers
        print(f"STREAMED smollm2 forward_sample: {st0['streamed_layers']}/{c.n_layers} streamed, "
              f"{st['bytes_streamed'] / 1e6:.1f} MB over {st['passes']} passes, ids {got}")
    finally:
        m.close()


@pytest.fixture(scope="module")
def streamed_engine(smollm2_path, smollm2_file, lib):
    """An Engine on the CUDA backend whose budget (the half-resident pool plus the reserve for
    kernels, cuBLAS and graphs; the context exists already) makes its model stream."""
    from aircupy import Engine
    from aircupy.cuda.memory import OUTSIDE_RESERVE
    g, c = smollm2_file
    budget = _half_pool(g, c) + OUTSIDE_RESERVE
    e = Engine(smollm2_path, backend="cuda", vram_budget=budget, n_ctx=N_CTX)
    yield e, budget
    e.close()


def test_smollm2_engine_over_a_streamed_model_equals_numpy(streamed_engine, smollm2_path):
    from tests.helpers.engines import numpy_engine
    e, budget = streamed_engine
    st = e.model.stats()
    assert e.backend_name == "cuda" and 0 < st["streamed_layers"] < e.config.n_layers
    assert st["device_bytes"] <= budget
    got = e.generate([{"role": "user", "content": "Name three colours."}], temperature=0.0,
                     max_tokens=24, ignore_eos=True)
    want = numpy_engine(smollm2_path, N_CTX).generate([{"role": "user", "content": "Name three colours."}],
                                                      temperature=0.0, max_tokens=24, ignore_eos=True)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 24
    assert got.text == want.text
    assert e.model.stats()["bytes_streamed"] > st["bytes_streamed"]


def test_smollm2_server_over_a_streamed_model_answers_like_numpy(streamed_engine, smollm2_path):
    from aircupy.engine.params import SamplingParams
    from aircupy.server.app import create_app
    from tests.helpers.asgi_client import asgi_request
    from tests.helpers.engines import numpy_engine
    e, _ = streamed_engine
    app = create_app(e, "smollm2")
    status, body = asgi_request(app, "POST", "/v1/chat/completions",
                                {"model": "smollm2", "messages": HELLO, "max_tokens": 12,
                                 "temperature": 0})
    assert status == 200, body[:500]
    r = json.loads(body)
    want = numpy_engine(smollm2_path, N_CTX).generate(HELLO, SamplingParams(max_tokens=12,
                                                                            temperature=0))
    assert r["choices"][0]["message"]["content"] == want.text
    assert r["usage"]["completion_tokens"] == len(want.token_ids)
    assert r["choices"][0]["finish_reason"] == want.finish_reason
    status, body = asgi_request(app, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert not app.state.server.generations     # nothing left in flight
