"""Synthetic GGUF models (aircupy.synth): right names/shapes/metadata, valid blocks, load end to end."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from aircupy.config import ModelConfig
from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.gguf.quants import dequantize
from aircupy.gguf.reader import GGUFFile, parse_header
from aircupy.gguf.tokenizer import Tokenizer
from aircupy.reference.model import NumpyModel
from aircupy.synth import PRESETS, synth_model
from aircupy.synth.shapes import tensor_plan, with_overrides
from aircupy.synth.vocab import build_vocab
from aircupy.synth.writer import TensorSource, header_bytes

# Small enough for the numpy model in milliseconds; 256-wide rows so K-quants need no fallback.
TINY = dict(vocab=400, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
# The mixtures of experts have their own tests (tests/test_moe_synth.py).
DENSE = sorted(p for p, s in PRESETS.items() if not s.n_expert)


def _tiny(tmp_path, preset, qtype, **kw):
    over = dict(TINY, **kw)
    if preset == "gemma3-270m":
        over.setdefault("sliding_window", 8)
    return synth_model(tmp_path / f"{preset}-{qtype}.gguf", preset, qtype, n_layers=2,
                       overrides=over, seed=3)


@pytest.mark.parametrize("preset,n_params", [("llama3-8b", 8_030_261_248),
                                             ("llama-70b", 70_553_706_496)])
def test_full_size_shapes_have_the_real_parameter_count(preset, n_params):
    plan = tensor_plan(PRESETS[preset], GGMLType.Q4_0)
    assert sum(int(np.prod(t.shape)) for t in plan) == n_params
    assert len(plan) == 2 + 1 + 9 * PRESETS[preset].n_layers  # embd, norm, output + 9 per layer


@pytest.mark.parametrize("preset", DENSE)
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q8_0", "Q6_K"])
def test_tiny_models_load_through_reader_config_tokenizer_and_numpy_model(tmp_path, preset, qtype):
    rep = _tiny(tmp_path, preset, qtype)
    shape = with_overrides(PRESETS[preset], n_layers=2, **TINY)
    with GGUFFile(rep.path) as g:
        assert g.file_size == rep.nbytes
        plan = tensor_plan(shape, GGMLType[qtype])
        assert [(t.name, t.ggml_type, t.shape) for t in plan] == \
            [(t.name, t.ggml_type, t.shape) for t in g.tensors.values()]
        c = ModelConfig.from_gguf(g)
        assert (c.arch, c.n_layers, c.n_embd, c.n_ff, c.n_head, c.n_head_kv, c.head_dim,
                c.vocab_size) == (shape.arch, 2, 256, 512, 4, 2, 64, 400)
        assert c.tied_output == shape.tied and c.qk_norm == shape.qk_norm
        assert c.attn_bias == shape.qkv_bias and c.post_norms == shape.post_norms
        tok = Tokenizer.from_gguf(g)
        text = "Hello world, why is the sky blue?"
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges apply
        m = NumpyModel(g, c)
        cache = m.new_cache(32)
        logits = m.forward(np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32), cache,
                           all_logits=True)
        assert logits.shape == (len(ids), 400) and np.isfinite(logits).all()
        # The head is scaled for logits of RMS ~4 (logit_std): a sane, non-degenerate distribution.
        assert 1.0 < logits.std() < 20.0


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                                   "Q5_K", "Q6_K", "F16"])
def test_blocks_dequantize_finite_at_the_requested_scale(tmp_path, qtype):
    rep = _tiny(tmp_path, "llama3-8b", qtype)
    with GGUFFile(rep.path) as g:
        t = g.tensors["blk.0.ffn_down.weight"]  # (E, F): RMS asked = 1/sqrt(F)
        w = dequantize(t.data, t.ggml_type, t.shape)
        assert np.isfinite(w).all()
        rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
        # Block scales are jittered +-50% around the target, so the RMS lands within ~25% of it.
        assert 0.75 < rms * np.sqrt(512) < 1.35, rms
        assert abs(float(w.mean())) < 0.2 * rms  # centred (Q4_0's -0.5 offset is the largest bias)


def test_row_lengths_that_do_not_fit_k_blocks_fall_back_like_llama_cpp(tmp_path):
    rep = synth_model(tmp_path / "q.gguf", "qwen2-0.5b", "Q4_K", n_layers=1,
                      overrides=dict(vocab=300, n_ff=640))
    with GGUFFile(rep.path) as g:
        assert g.tensors["blk.0.attn_q.weight"].ggml_type == GGMLType.Q5_0   # K = 896
        assert g.tensors["blk.0.ffn_down.weight"].ggml_type == GGMLType.Q5_0  # K = 640
        assert g.metadata["general.file_type"] == 14


def test_header_round_trips_through_the_reader():
    md = {"general.architecture": "llama", "a.int": 7, "a.neg": -3, "a.f": 0.5, "a.b": True,
          "a.s": "héllo", "a.list": ["x", "", "zz"], "a.arr": np.arange(5, dtype=np.int32)}
    ts = [TensorSource("w", GGMLType.Q4_0, (3, 64), lambda: ()),
          TensorSource("n", GGMLType.F32, (5,), lambda: ())]
    head, offsets = header_bytes(md, ts)
    data_size = offsets[-1] + tensor_nbytes(GGMLType.F32, (5,))
    h = parse_header(head + bytes(data_size), "<mem>")
    assert h.data_offset == len(head) and len(head) % 32 == 0
    assert {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in h.metadata.items()} == \
        {**md, "a.arr": [0, 1, 2, 3, 4]}
    assert [(s.name, s.shape, s.offset - h.data_offset) for s in h.tensors.values()] == \
        [("w", (3, 64), 0), ("n", (5,), offsets[1])]


def test_vocab_is_consistent_bpe():
    v = build_vocab(1000, seed=1)
    assert len(v.tokens) == 1000 == len(set(v.tokens))
    known = set()
    for tok in v.tokens[4:260]:
        known.add(tok)
    for m in v.merges:  # each merge joins two earlier tokens into a later one
        a, b = m.split(" ")
        assert a in known and b in known
        known.add(a + b)
    assert known == set(v.tokens[4:])


def test_cli_synth_writes_a_loadable_file(tmp_path):
    from aircupy.cli import main
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["synth", str(out), "--arch", "qwen3-0.6b", "--type", "q8_0",
                                  "--layers", "1", "--set", "vocab=300", "--set", "n_embd=128",
                                  "--set", "n_ff=256"])
    assert r.exit_code == 0, r.output
    assert "qwen3-0.6b" in r.output and "GB/s" in r.output
    with GGUFFile(out) as g:
        assert g.tensors["token_embd.weight"].shape == (300, 128)
        assert g.metadata["qwen3.block_count"] == 1
    bad = CliRunner().invoke(main, ["synth", str(out), "--arch", "nope"])
    assert bad.exit_code == 2 and "unknown architecture preset" in bad.output
