"""Hostile metadata: every value is checked against the tensors (or for range) before anything is sized
from it, and `generate`/`serve` report it in one line with exit status 2, as `inspect` does."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.errors import InvalidParameterError, UnsupportedModelError
from aircupy.gguf.reader import GGUFFile
from aircupy.synth.vocab import build_vocab, tokenizer_metadata
from tests.helpers.gguf_build import T, write_gguf
from tests.helpers.tiny_models import TINY, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    path = write_tiny_model(d / "ok.gguf", replace(TINY["llama"], n_layers=2, vocab=300))
    g = GGUFFile(path)
    md = {**g.metadata, **tokenizer_metadata(build_vocab(300), add_bos=True)}   # so an Engine can load it
    return d, md, [T(n, t.ggml_type, t.shape, bytes(t.data)) for n, t in g.tensors.items()]


def rewrite(tiny, name: str, drop=(), **changes) -> str:
    d, md, tensors = tiny
    md = {k: v for k, v in md.items() if k not in drop}
    md.update(changes)
    return str(write_gguf(d / f"{name}.gguf", metadata=md, tensors=tensors))


BAD = [  # (name, metadata changes, what the message names)
    ("ctx_zero", {"llama.context_length": 0}, "context_length"),
    ("ctx_negative", {"llama.context_length": -8}, "context_length"),
    ("ctx_huge", {"llama.context_length": 2**40}, "context_length"),
    ("blocks_2_31", {"llama.block_count": 2**31}, "block_count"),
    ("blocks_more", {"llama.block_count": 3}, "block_count"),
    ("blocks_zero", {"llama.block_count": 0}, "block_count"),
    ("rope_nan", {"llama.rope.freq_base": float("nan")}, "freq_base"),
    ("rope_negative", {"llama.rope.freq_base": -1.0}, "freq_base"),
    ("eps_negative", {"llama.attention.layer_norm_rms_epsilon": -1e-5}, "epsilon"),
    ("eps_inf", {"llama.attention.layer_norm_rms_epsilon": float("inf")}, "epsilon"),
    ("embd_wrong", {"llama.embedding_length": 64}, "embedding_length"),
    ("heads_wrong", {"llama.attention.head_count": 8}, "8 heads"),
    ("kv_heads_wrong", {"llama.attention.head_count_kv": 4}, "attn_k"),
    ("ffn_wrong", {"llama.feed_forward_length": 4096}, "ffn_gate"),
    ("window_negative", {"llama.attention.sliding_window": -4}, "sliding_window"),
    ("scale_nan", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": float("nan")}, "factor"),
    ("empty_vocab", {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [],
                     "tokenizer.ggml.merges": ["a b"]}, "vocabulary has 0 tokens"),
    ("eos_outside", {"tokenizer.ggml.eos_token_id": 5000}, "eos_token_id"),
    ("rope_dim_zero", {"llama.rope.dimension_count": 0}, "rope dimension"),
]


@pytest.mark.parametrize("name, changes, names", BAD, ids=[b[0] for b in BAD])
def test_bad_metadata_is_refused_naming_it(tiny, name, changes, names):
    g = GGUFFile(rewrite(tiny, name, **changes))
    with pytest.raises(UnsupportedModelError, match=names):
        ModelConfig.from_gguf(g)


def test_the_good_file_still_loads(tiny):
    c = ModelConfig.from_gguf(GGUFFile(rewrite(tiny, "good")))
    assert (c.n_layers, c.n_embd, c.n_ctx_train) == (2, 32, 256)


def test_a_context_whose_kv_cache_cannot_fit_memory_is_refused_before_allocating(tiny):
    from aircupy import Engine
    path = rewrite(tiny, "long_ctx", **{"llama.context_length": 2**30})
    with pytest.raises(InvalidParameterError, match="n_ctx.*GiB of KV cache") as ei:
        Engine(path, backend="numpy", n_ctx=2**30)
    assert ei.value.param == "n_ctx"


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aircupy", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AIRCUPY_API_KEY": ""})


@pytest.mark.parametrize("name, changes", [("cli_ctx", {"llama.context_length": -1}),
                                           ("cli_blocks", {"llama.block_count": 2**31}),
                                           ("cli_rope", {"llama.rope.freq_base": float("nan")})])
def test_generate_and_serve_say_one_line_and_exit_2(tiny, name, changes):
    path = rewrite(tiny, name, **changes)
    for args in (["generate", "--model", path, "--backend", "numpy", "hi"],
                 ["serve", "--model", path, "--backend", "numpy", "--port", "0"]):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
        assert len([x for x in r.stderr.splitlines() if x.startswith("error:")]) == 1


def test_n_ctx_beyond_memory_is_one_line(tiny):
    path = rewrite(tiny, "cli_long", **{"llama.context_length": 2**30})
    r = _cli("generate", "--model", path, "--backend", "numpy", "--n-ctx", str(2**30), "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "KV cache" in r.stderr


def test_uniform_arrays_and_shapes_of_every_layer_are_checked(tiny):
    d, md, tensors = tiny
    # layer 1's attn_k is the wrong size while layer 0's is right: the file is refused naming it
    bad = [t if t.name != "blk.1.attn_k.weight" else
           T(t.name, t.ggml_type, (t.shape[0] * 2, t.shape[1]), bytes(np.zeros(t.shape[0] * 2 * t.shape[1], np.float32)))
           for t in tensors]
    g = GGUFFile(write_gguf(d / "layer1.gguf", metadata=md, tensors=bad))
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.attn_k\.weight"):
        ModelConfig.from_gguf(g)
