"""NumpyModel on tiny random-weight GGUFs of every architecture, against a plain float64 per-token
implementation (tests/helpers/naive_forward.py), plus KV-cache behaviour: prefill == incremental decode,
chunked prefill, truncate, sliding window, context overflow, and errors for broken files."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.errors import ContextLengthError, UnsupportedModelError
from aircupy.gguf.reader import GGUFFile
from aircupy.reference.model import NumpyModel
from tests.helpers.gguf_build import T, write_gguf
from tests.helpers.naive_forward import naive_logits
from tests.helpers.tiny_models import TINY, write_tiny_model, without_window

IDS = np.array([1, 17, 5, 88, 42, 3, 60, 9, 71, 23, 50, 7, 30, 64], dtype=np.int32)  # 14 > window 4


def _load(path):
    g = GGUFFile(path)
    return NumpyModel(g, ModelConfig.from_gguf(g))


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf", TINY[request.param])
    return request.param, path, _load(path)


def _prefill(model, ids, n_ctx=64):
    cache = model.new_cache(n_ctx)
    return model.forward(ids, np.arange(len(ids), dtype=np.int32), cache, all_logits=True), cache


def _close(a, b, rel=1e-4):
    """Equal up to float32 rounding, relative to the largest logit magnitude of each row."""
    scale = np.abs(b).max(axis=-1, keepdims=True)
    assert (np.abs(a - b) / scale).max() <= rel, (np.abs(a - b) / scale).max()


def test_prefill_matches_naive_implementation(tiny):
    name, path, model = tiny
    logits, cache = _prefill(model, IDS)
    assert logits.shape == (len(IDS), TINY[name].vocab) and logits.dtype == np.float32
    assert cache.length == len(IDS)
    _close(logits, naive_logits(path, IDS.tolist()))
    last = model.forward(IDS, np.arange(len(IDS), dtype=np.int32), model.new_cache(64))
    assert last.shape == (1, TINY[name].vocab)
    _close(last, logits[-1:])


def test_incremental_decode_and_chunked_prefill_match_prefill(tiny):
    _, _, model = tiny
    full, _ = _prefill(model, IDS)
    cache = model.new_cache(64)
    steps = [model.forward(IDS[t:t + 1], np.array([t], np.int32), cache)[0] for t in range(len(IDS))]
    _close(np.array(steps), full)
    cache = model.new_cache(64)
    a = model.forward(IDS[:5], np.arange(5, dtype=np.int32), cache, all_logits=True)
    b = model.forward(IDS[5:], np.arange(5, len(IDS), dtype=np.int32), cache, all_logits=True)
    _close(np.concatenate([a, b]), full)
    assert cache.length == len(IDS)


def test_truncate_reuses_the_prefix(tiny):
    _, _, model = tiny
    full, cache = _prefill(model, IDS)
    cache.truncate(6)
    assert cache.length == 6
    again = model.forward(IDS[6:], np.arange(6, len(IDS), dtype=np.int32), cache, all_logits=True)
    _close(again, full[6:])
    # a different continuation after truncation equals a fresh run of that sequence
    other = IDS.copy()
    other[6:] = other[6:][::-1]
    cache.truncate(6)
    cont = model.forward(other[6:], np.arange(6, len(IDS), dtype=np.int32), cache, all_logits=True)
    fresh, _ = _prefill(model, other)
    _close(cont, fresh[6:])
    with pytest.raises(ValueError):
        cache.truncate(cache.length + 1)


def test_sliding_window_changes_only_what_it_should(tmp_path):
    spec = TINY["gemma3"]
    model = _load(write_tiny_model(tmp_path / "swa.gguf", spec))
    c = model.config
    assert c.sliding_window == 4 and c.swa_layers == (True,) * 5 + (False,)
    assert c.rope_base_local == 10000.0 and c.rope_base == 1e6
    full = _load(write_tiny_model(tmp_path / "full.gguf", without_window(spec)))
    with_w, _ = _prefill(model, IDS)
    without, _ = _prefill(full, IDS)
    # Rope bases differ too without a window, so compare only the first token (position 0 rotates
    # nothing and sees only itself): equal there, different once the window cuts keys off.
    _close(with_w[:1], without[:1])
    assert np.abs(with_w[5:] - without[5:]).max() > 1e-2


def test_context_overflow_raises_and_leaves_cache_intact(tiny):
    _, _, model = tiny
    cache = model.new_cache(8)
    model.forward(IDS[:6], np.arange(6, dtype=np.int32), cache)
    with pytest.raises(ContextLengthError):
        model.forward(IDS[6:9], np.arange(6, 9, dtype=np.int32), cache)
    assert cache.length == 6


def test_config_of_tiny_models(tiny):
    name, _, model = tiny
    c, spec = model.config, TINY[name]
    assert (c.arch, c.n_layers, c.n_embd, c.n_head, c.n_head_kv) == (spec.arch, spec.n_layers, 32, 4, spec.n_head_kv)
    assert c.head_dim == (spec.head_dim or 8) and c.tied_output == spec.tied
    assert c.rope_type == ("norm" if spec.arch == "llama" else "neox")
    assert c.qk_norm == (spec.arch in ("qwen3", "gemma3")) and c.attn_bias == (spec.arch == "qwen2")
    assert c.rope_scaling.kind == ("linear" if spec.linear_scale else "none")
    assert (model.rope_freqs is not None) == spec.rope_freqs


def test_missing_tensor_is_named(tmp_path):
    spec = replace(TINY["qwen3"], n_layers=2)
    path = write_tiny_model(tmp_path / "ok.gguf", spec)
    g = GGUFFile(path)
    kept = [T(n, t.ggml_type, t.shape, bytes(t.data)) for n, t in g.tensors.items() if n != "blk.1.attn_k_norm.weight"]
    broken = write_gguf(tmp_path / "broken.gguf", metadata=dict(g.metadata), tensors=kept)
    g2 = GGUFFile(broken)
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.attn_k_norm\.weight"):
        NumpyModel(g2, ModelConfig.from_gguf(g2))


def test_wrong_tensor_shape_is_an_error(tmp_path):
    path = write_tiny_model(tmp_path / "ok.gguf", replace(TINY["llama"], n_layers=1))
    g = GGUFFile(path)
    md = dict(g.metadata)
    md["llama.feed_forward_length"] = 64  # file holds 48-wide FFN weights
    bad = write_gguf(tmp_path / "bad.gguf", metadata=md,
                     tensors=[T(n, t.ggml_type, t.shape, bytes(t.data)) for n, t in g.tensors.items()])
    g2 = GGUFFile(bad)
    with pytest.raises(UnsupportedModelError, match="ffn_gate"):
        NumpyModel(g2, ModelConfig.from_gguf(g2))
