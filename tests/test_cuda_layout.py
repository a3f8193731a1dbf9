"""Layer block layouts of the CUDA model (pure arithmetic, no GPU): stacking, offsets, sizes."""
from __future__ import annotations

import pytest

from aircupy.config import ModelConfig
from aircupy.gguf.ggml import GGMLType
from aircupy.gguf.reader import GGUFFile
from aircupy.gguf.arch import tensor_map
from aircupy.cuda.layout import ALIGN, global_layout, layer_layout
from aircupy.cuda.ops.packing import repack_nbytes
from aircupy.synth import synth_model


@pytest.fixture(scope="module")
def smol(smollm2_path):
    with GGUFFile(smollm2_path) as g:
        c = ModelConfig.from_gguf(g)
        yield g, c, tensor_map(c.arch, c.n_layers, g.tensors)


def test_smollm2_layer_stacks_qkv_and_gate_up(smol):
    g, c, tm = smol
    lay = layer_layout(tm.layers[3], g.tensors, can_stack_repacked=True)
    assert list(lay.pieces) == ["attn_norm", "ffn_norm", "qkv", "wo", "gate_up", "down"]
    qkv = lay.pieces["qkv"]
    assert qkv.shape == (576 + 192 + 192, 576) and qkv.ggml_type == GGMLType.Q4_1
    assert qkv.sources == (("blk.3.attn_q.weight", 0), ("blk.3.attn_k.weight", 576),
                           ("blk.3.attn_v.weight", 768))
    assert lay.pieces["gate_up"].shape == (2 * 1536, 576)
    assert qkv.nbytes == repack_nbytes(GGMLType.Q4_1, (960, 576))
    # Pieces are aligned, disjoint and inside the block.
    ps = sorted(lay.pieces.values(), key=lambda p: p.offset)
    assert all(p.offset % ALIGN == 0 for p in ps)
    assert all(a.offset + a.nbytes <= b.offset for a, b in zip(ps, ps[1:]))
    assert ps[-1].offset + ps[-1].nbytes <= lay.nbytes


def test_without_stacking_repacked_types_stay_separate(smol):
    g, c, tm = smol
    lay = layer_layout(tm.layers[0], g.tensors, can_stack_repacked=False)
    assert {"q", "k", "v", "gate", "up"} <= set(lay.pieces) and "qkv" not in lay.pieces


def test_tied_globals_have_no_output_piece(smol):
    g, c, tm = smol
    glob = global_layout(tm.globals, g.tensors)
    assert set(glob.pieces) == {"token_embd", "output_norm"}
    assert glob.pieces["token_embd"].shape == (49152, 576)


def test_mixed_types_and_qwen2_biases(tmp_path):
    # qwen2's q/k/v biases stack like the matrices (zeros would fill any missing one).
    rep = synth_model(tmp_path / "q.gguf", "qwen2-0.5b", "Q4_K", n_layers=1,
                      overrides=dict(vocab=300, n_embd=512, n_ff=768, n_head=8, n_head_kv=2))
    with GGUFFile(rep.path) as g:
        c = ModelConfig.from_gguf(g)
        lay = layer_layout(tensor_map(c.arch, 1, g.tensors).layers[0], g.tensors, True)
    assert lay.pieces["qkv"].shape == (512 + 128 + 128, 512)
    b = lay.pieces["b_qkv"]
    assert b.shape == (768,) and b.ggml_type == GGMLType.F32 and b.nbytes == 768 * 4
    assert [row for _, row in b.sources] == [0, 512, 640]
    assert lay.pieces["down"].ggml_type == GGMLType.Q4_K and lay.pieces["down"].shape == (512, 768)
