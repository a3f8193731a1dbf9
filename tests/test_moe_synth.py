"""Mixture-of-experts files: synth presets against the real models' shapes, ModelConfig's expert
metadata (and its errors), and what `aircupy inspect` shows for them."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from aircupy.config import ModelConfig
from aircupy.errors import UnsupportedModelError
from aircupy.gguf.ggml import GGMLType
from aircupy.gguf.reader import GGUFFile
from aircupy.inspect import describe, render_text
from aircupy.reference.model import NumpyModel
from aircupy.synth import PRESETS, synth_model
from aircupy.synth.shapes import model_metadata, tensor_plan, with_overrides

# Real models, from their HF configs: total parameters and the expert metadata the converter writes
# (expert_count, expert_used_count, expert width, shared expert width), layers, width.
REAL = {
    "qwen3-30b-a3b": (30_532_122_624, "qwen3moe", 128, 8, 768, 0, 48, 2048),
    "mixtral-8x7b": (46_702_792_704, "llama", 8, 2, 14336, 0, 32, 4096),
    "qwen2-57b-a14b": (57_408_658_944, "qwen2moe", 64, 8, 2560, 20480, 28, 3584),
}


def _header_only(shape, qtype=GGMLType.Q4_K):
    """What from_gguf reads (metadata and tensor shapes) of a full-size synthetic model, no data."""
    md = model_metadata(shape, qtype, "x")
    plan = tensor_plan(shape, qtype)
    tensors = {p.name: SimpleNamespace(name=p.name, shape=p.shape, ggml_type=p.ggml_type) for p in plan}
    return SimpleNamespace(metadata=md, get=md.get, tensors=tensors), plan


@pytest.mark.parametrize("preset", sorted(REAL))
def test_full_size_presets_have_the_real_shapes(preset):
    n_params, arch, X, k, F, S, L, E = REAL[preset]
    g, plan = _header_only(PRESETS[preset])
    assert sum(int(np.prod(p.shape)) for p in plan) == n_params
    c = ModelConfig.from_gguf(g)
    assert (c.arch, c.n_expert, c.n_expert_used, c.n_ff_exp, c.n_ff_shexp, c.n_layers, c.n_embd) == \
        (arch, X, k, F, S, L, E)
    assert c.expert_weights_norm == (arch != "qwen2moe")
    assert g.tensors["blk.0.ffn_up_exps.weight"].shape == (X, F, E)
    assert g.tensors["blk.0.ffn_down_exps.weight"].shape == (X, E, F)
    assert g.tensors["blk.0.ffn_gate_inp.weight"].ggml_type == GGMLType.F32   # routers stay F32
    assert ("blk.0.ffn_gate_inp_shexp.weight" in g.tensors) == (S > 0)
    assert "blk.0.ffn_gate.weight" not in g.tensors


@pytest.mark.parametrize("preset", ["tiny-qwen3moe", "tiny-qwen2moe", "tiny-mixtral"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_K"])
def test_tiny_presets_load_and_run(tmp_path, preset, qtype):
    rep = synth_model(tmp_path / "m.gguf", preset, qtype, seed=2)
    with GGUFFile(rep.path) as g:
        plan = tensor_plan(PRESETS[preset], GGMLType[qtype])
        assert [(p.name, p.shape, p.ggml_type) for p in plan] == \
            [(t.name, t.shape, t.ggml_type) for t in g.tensors.values()]
        c = ModelConfig.from_gguf(g)
        assert c.is_moe and c.n_expert == PRESETS[preset].n_expert
        m = NumpyModel(g, c)
        logits = m.forward(np.arange(4, 20, dtype=np.int32), np.arange(16, dtype=np.int32), m.new_cache(16),
                           all_logits=True)
        assert logits.shape == (16, c.vocab_size) and np.isfinite(logits).all()
        assert 1.0 < logits.std() < 20.0           # the weight scales keep logits at the intended RMS


def test_cli_synth_writes_a_moe_preset(tmp_path):
    from aircupy.cli import main
    out = tmp_path / "mx.gguf"
    r = CliRunner().invoke(main, ["synth", str(out), "--arch", "tiny-mixtral", "--type", "F16", "--layers", "1"])
    assert r.exit_code == 0, r.output
    assert "tiny-mixtral (llama, 1 layers" in r.output
    with GGUFFile(out) as g:
        assert g.get("llama.expert_count") == 4 and g.get("llama.expert_used_count") == 2
        assert "llama.expert_feed_forward_length" not in g.metadata   # Mixtral's experts are n_ff wide


def test_synth_rejects_inconsistent_expert_shapes():
    with pytest.raises(ValueError, match="n_expert_used"):
        with_overrides(PRESETS["tiny-mixtral"], n_expert_used=5)
    with pytest.raises(ValueError, match="shared expert"):
        with_overrides(PRESETS["tiny-qwen3moe"], n_ff_shexp=32)


# -- ModelConfig's expert metadata ------------------------------------------------------------------------

def _tiny_header(preset="tiny-qwen2moe", drop=(), **md_changes):
    g, _ = _header_only(PRESETS[preset], GGMLType.F32)
    a = PRESETS[preset].arch
    for k in drop:
        del g.metadata[f"{a}.{k}"]
    g.metadata.update({f"{a}.{k}": v for k, v in md_changes.items()})
    return g


def test_expert_widths_fall_back_as_llama_cpp_does():
    c = ModelConfig.from_gguf(_tiny_header())
    assert (c.n_ff, c.n_ff_exp, c.n_ff_shexp) == (192, 64, 128)
    # without the keys: n_ff / expert_used_count and n_ff (shapes then disagree: named in the error)
    g = _tiny_header(drop=("expert_feed_forward_length", "expert_shared_feed_forward_length"))
    with pytest.raises(UnsupportedModelError, match=r"ffn_gate_exps.*\(8, 96, 128\)"):
        ModelConfig.from_gguf(g)
    g = _tiny_header(drop=("expert_feed_forward_length",), feed_forward_length=128)   # 128 / 2 = 64
    assert ModelConfig.from_gguf(g).n_ff_exp == 64
    g = _tiny_header(drop=("expert_shared_feed_forward_length",), feed_forward_length=128)
    assert ModelConfig.from_gguf(g).n_ff_shexp == 128
    # the shared gate as (E,) is accepted as well as the converter's (1, E)
    g = _tiny_header()
    for i in range(2):
        g.tensors[f"blk.{i}.ffn_gate_inp_shexp.weight"].shape = (128,)
    assert ModelConfig.from_gguf(g).n_ff_shexp == 128


@pytest.mark.parametrize("changes,match", [
    ({"expert_used_count": 9}, r"expert_used_count 9 is not in \[1, 8\]"),
    ({"expert_used_count": 0}, r"expert_used_count 0"),
    ({"expert_count": 2000}, r"expert_count 2000 is not in \[1, 1024\]"),
    ({"expert_count": 0}, r"expert_count 0"),
    ({"expert_count": 16}, r"ffn_gate_inp.weight has shape \(8, 128\)"),
])
def test_bad_expert_metadata_is_refused(changes, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_gguf(_tiny_header(**changes))


def test_dense_llama_and_moe_llama_are_told_apart_by_expert_count():
    g = _tiny_header("tiny-mixtral", drop=("expert_count", "expert_used_count"))
    with pytest.raises(UnsupportedModelError, match=r"missing tensor 'blk.0.ffn_gate.weight'"):
        ModelConfig.from_gguf(g)
    g = _tiny_header("tiny-qwen3moe", drop=("expert_count",))
    with pytest.raises(UnsupportedModelError, match=r"expert_count 0"):
        ModelConfig.from_gguf(g)


# -- inspect ---------------------------------------------------------------------------------------------

def test_inspect_shows_experts(tmp_path, smollm2_path):
    rep = synth_model(tmp_path / "q3.gguf", "tiny-qwen3moe", "Q8_0", seed=1)
    with GGUFFile(rep.path) as g:
        d = describe(g)
        one = sum(g.tensors[f"blk.0.ffn_{r}_exps.weight"].nbytes // 8 for r in ("gate", "up", "down"))
    x = d["experts"]
    assert (x["count"], x["used"], x["feed_forward_length"], x["shared_feed_forward_length"]) == (8, 3, 64, None)
    assert x["per_expert_bytes"] == [{"layer": 0, "bytes": one}, {"layer": 1, "bytes": one}]
    assert x["routed_bytes"] == 2 * 8 * one and x["routed_bytes_per_token"] == 2 * 3 * one
    text = render_text(d)
    assert "experts: 8 per layer, 3 used per token (expert width 64)" in text
    assert "a token reads" in text
    with GGUFFile(smollm2_path) as g:
        dense = describe(g)
    assert "experts" not in dense and "experts:" not in render_text(dense)
