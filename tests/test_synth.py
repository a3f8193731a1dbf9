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


# ---- the Q4_K_M mix (aircupy/synth/mixes.py) ------------------------------------------------------

def _types(plan):
    from collections import Counter
    return Counter(p.ggml_type.name for p in plan)


def test_q4_k_m_mix_equals_the_real_gemma3_file_tensor_by_tensor(gemma3_path):
    """The real gemma-3-270m Q4_K_M (quantized by llama.cpp) is the oracle: every tensor's type, the
    row-length fallbacks (640-wide rows: Q4_K -> Q5_0, the tied head Q8_0) included."""
    from aircupy.synth import plan_for
    plan, md = plan_for(PRESETS["gemma3-270m"], "Q4_K_M")
    with GGUFFile(gemma3_path) as g:
        real = {t.name: (t.ggml_type, t.shape) for t in g.tensors.values()}
        assert md["general.file_type"] == g.metadata["general.file_type"] == 15
    assert {p.name: (p.ggml_type, p.shape) for p in plan} == real


# Type counts llama.cpp's loader prints for the real Meta-Llama-3-8B and -70B Q4_K_M files
# ("llama_model_loader: - type q6_K: 33 tensors", ...).
@pytest.mark.parametrize("preset,counts", [
    ("llama3-8b", {"F32": 65, "Q4_K": 193, "Q6_K": 33}),
    ("llama-70b", {"F32": 161, "Q4_K": 441, "Q5_K": 40, "Q6_K": 81})])
def test_q4_k_m_mix_counts_match_the_real_llama_files(preset, counts):
    from aircupy.synth import plan_for
    plan, _ = plan_for(PRESETS[preset], "Q4_K_M")
    assert dict(_types(plan)) == counts
    types = {p.name: p.ggml_type for p in plan}
    assert types["output.weight"] == GGMLType.Q6_K and types["token_embd.weight"] == GGMLType.Q4_K
    n = PRESETS[preset].n_layers
    # use_more_bits by hand for 32 layers: the first and last 4, and 6, 9, ..., 27 between
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31} if n == 32 else \
        set(range(10)) | set(range(70, 80)) | set(range(12, 70, 3))
    for i in range(n):
        want_v = GGMLType.Q6_K if i in more else (GGMLType.Q5_K if n == 80 else GGMLType.Q4_K)
        assert types[f"blk.{i}.attn_v.weight"] == want_v, i
        assert types[f"blk.{i}.ffn_down.weight"] == (GGMLType.Q6_K if i in more else GGMLType.Q4_K), i
        for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{other}.weight"] == GGMLType.Q4_K


def test_q4_k_m_tiny_file_has_the_plans_types_and_runs_on_numpy(tmp_path):
    from aircupy.synth.mixes import use_more_bits
    rep = synth_model(tmp_path / "mix.gguf", "llama3-8b", "q4_k_m", n_layers=8, overrides=TINY, seed=2)
    assert rep.mix == "Q4_K_M" and "Q4_K_M mix" in rep.summary()
    with GGUFFile(rep.path) as g:
        assert g.metadata["general.file_type"] == 15
        t = {name: x.ggml_type for name, x in g.tensors.items()}
        assert t["output.weight"] == GGMLType.Q6_K
        more = [i for i in range(8) if use_more_bits(i, 8)]
        assert more == [0, 3, 6, 7]          # n/8 = 1: layer 0, layer 7, and (i - 1) % 3 == 2
        assert [i for i in range(8) if t[f"blk.{i}.ffn_down.weight"] == GGMLType.Q6_K] == more
        assert [i for i in range(8) if t[f"blk.{i}.attn_v.weight"] == GGMLType.Q6_K] == more
        assert {t[f"blk.{i}.attn_q.weight"] for i in range(8)} == {GGMLType.Q4_K}
        for name, x in g.tensors.items():   # valid blocks: every type dequantizes finite
            if x.ggml_type != GGMLType.F32:
                assert np.isfinite(dequantize(x.data, x.ggml_type, x.shape)).all(), name
        c = ModelConfig.from_gguf(g)
        m = NumpyModel(g, c)
        ids = np.arange(4, 20, dtype=np.int32)
        logits = m.forward(ids, np.arange(16, dtype=np.int32), m.new_cache(32), all_logits=True)
        assert logits.shape == (16, 400) and np.isfinite(logits).all() and 1.0 < logits.std() < 20.0


def test_cli_synth_mix(tmp_path):
    from aircupy.cli import main
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(main, ["synth", str(out), "--arch", "llama3-8b", "--mix", "q4_k_m",
                                  "--layers", "2", "--set", "vocab=300", "--set", "n_embd=256",
                                  "--set", "n_ff=512", "--set", "n_head=4", "--set", "n_head_kv=2",
                                  "--set", "head_dim=64"])
    assert r.exit_code == 0, r.output
    assert "Q4_K_M mix" in r.output
    with GGUFFile(out) as g:
        assert g.tensors["output.weight"].ggml_type == GGMLType.Q6_K
        assert g.tensors["blk.1.attn_q.weight"].ggml_type == GGMLType.Q4_K
    bad = CliRunner().invoke(main, ["synth", str(out), "--mix", "q3_k_xl"])
    assert bad.exit_code == 2 and "unknown mix" in bad.output


def test_virtual_layout_of_a_mix_equals_the_written_file(tmp_path):
    """The bench plans a Q4_K_M file it has not written from its exact layout (models.virtual_gguf)."""
    from bench.harness.models import virtual_gguf
    v = virtual_gguf("smollm2-135m:Q4_K_M")
    rep = synth_model(tmp_path / "s.gguf", "smollm2-135m", "Q4_K_M", seed=0)
    with GGUFFile(rep.path) as g:
        assert v.file_size == g.file_size
        assert {n: (t.ggml_type, t.shape, t.offset) for n, t in v.tensors.items()} == \
            {n: (t.ggml_type, t.shape, t.offset) for n, t in g.tensors.items()}
