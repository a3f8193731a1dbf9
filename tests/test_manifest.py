"""Manifest (4 KiB windows per layer): CPU tier."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from aircupy.config import ModelConfig
from aircupy.gguf.ggml import GGMLType, tensor_nbytes
from aircupy.gguf.reader import GGUFFile
from aircupy.stream.manifest import PAGE, build_manifest


def _fake_llama(n_layers, n_embd, n_ff, n_head, n_kv, vocab, qtype=GGMLType.Q4_0):
    """A tensor table laid out as convert_hf_to_gguf writes a llama model (32-byte aligned, no data)."""
    hd = n_embd // n_head
    shapes = [("token_embd.weight", (vocab, n_embd), qtype)]
    for i in range(n_layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (n_embd,), GGMLType.F32),
                   (f"blk.{i}.attn_q.weight", (n_embd, n_embd), qtype),
                   (f"blk.{i}.attn_k.weight", (n_kv * hd, n_embd), qtype),
                   (f"blk.{i}.attn_v.weight", (n_kv * hd, n_embd), qtype),
                   (f"blk.{i}.attn_output.weight", (n_embd, n_embd), qtype),
                   (f"blk.{i}.ffn_norm.weight", (n_embd,), GGMLType.F32),
                   (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), qtype),
                   (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), qtype),
                   (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), qtype)]
    shapes += [("output_norm.weight", (n_embd,), GGMLType.F32), ("output.weight", (vocab, n_embd), qtype)]
    off, tensors = 7 * 4096 + 123 * 32, {}
    for name, shape, t in shapes:
        nb = tensor_nbytes(t, shape)
        tensors[name] = SimpleNamespace(name=name, ggml_type=t, shape=shape, offset=off, nbytes=nb)
        off += -(-nb // 32) * 32
    g = SimpleNamespace(path="fake.gguf", file_size=off, tensors=tensors)
    cfg = SimpleNamespace(n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_kv, head_dim=hd,
                          head_dim_v=hd, vocab_size=vocab, n_layers=n_layers)
    return g, cfg


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with GGUFFile(smollm2_path) as g:
        return build_manifest(g), ModelConfig.from_gguf(g), g.tensors.copy(), g.file_size


def test_manifest_windows_are_page_aligned_and_hold_their_tensors(smollm2):
    m, cfg, tensors, size = smollm2
    assert m.n_layers == cfg.n_layers == 30
    names = set()
    for c in m.layers:
        assert c.offset % PAGE == 0
        assert c.nbytes % PAGE == 0 or c.end == size
        assert c.end <= size
        for t in c.tensors:
            names.add(t.name)
            info = tensors[t.name]
            assert t.name.startswith(f"blk.{c.layer}.")
            assert c.offset + t.offset == info.offset          # same bytes, window-relative
            assert 0 <= t.offset and t.offset + t.nbytes <= c.nbytes
            assert t.nbytes == info.nbytes
    glob = {t.name for c in m.globals for t in c.tensors}
    assert names | glob == set(tensors) and not names & glob
    assert {"token_embd.weight", "output_norm.weight"} <= glob


def test_window_clipped_at_end_of_file():
    g, _ = _fake_llama(2, 256, 512, 4, 2, 1000)
    m = build_manifest(g)
    last = max(m.globals, key=lambda c: c.end)
    assert last.end == g.file_size and g.file_size % PAGE != 0


# -- per-expert windows of mixture-of-experts layers -------------------------------------------------

def _stacked(name, offset, X, rows, cols, t=GGMLType.F16):
    nb = tensor_nbytes(t, (X, rows, cols))
    return SimpleNamespace(name=name, ggml_type=t, shape=(X, rows, cols), offset=offset, nbytes=nb)


def test_dense_models_have_no_expert_windows(smollm2):
    m = smollm2[0]
    assert m.experts == () and m.expert_windows(3) == () and m.expert_bytes(3) == 0
    assert "expert_windows" not in m.to_dict()


def test_expert_windows_pad_unaligned_slices_to_pages():
    """Expert slices of 5000 bytes from a tensor starting 96 bytes into a page: each window starts at
    the page holding the slice's first byte and ends at the page boundary after its last (the file's
    end for the last one); data_offset is the padding before the slice, and neighbours share a page."""
    X, rows, cols = 4, 25, 100                         # 25 * 100 f16 values = 5000 bytes per expert
    up = _stacked("blk.0.ffn_up_exps.weight", 3 * PAGE + 96, X, rows, cols)
    size = up.offset + up.nbytes + 10                  # the file ends 10 bytes after the tensor
    g = SimpleNamespace(path="fake.gguf", file_size=size, tensors={up.name: up})
    m = build_manifest(g)
    ws = m.expert_windows(0)
    assert [w.expert for w in ws] == [0, 1, 2, 3] and m.expert_bytes(0) == 5000
    got = [(w.offset, w.nbytes, w.data_offset, w.data_bytes) for w in ws]
    lo = [up.offset + e * 5000 for e in range(X)]      # 12384, 17384, 22384, 27384
    assert got == [(12288, 8192, 96, 5000), (16384, 8192, 1000, 5000), (20480, 8192, 1904, 5000),
                   (24576, size - 24576, 2808, 5000)]
    for w, first in zip(ws, lo):
        assert w.offset % PAGE == 0 and w.file_offset == first and w.data_offset < PAGE
        assert w.data_offset + w.data_bytes <= w.nbytes and w.end <= size
        assert w.nbytes % PAGE == 0 or w.end == size
        assert w.shape == (rows, cols) and w.tensor == up.name and w.layer == 0
    assert ws[0].end > ws[1].offset                     # one shared page between neighbours
    # the layer window is what it was without expert windows: the whole layer, page-widened
    assert (m.layers[0].offset, m.layers[0].end) == (3 * PAGE, size)


def test_expert_windows_of_an_aligned_slice_carry_no_padding():
    X = 3
    gate = _stacked("blk.1.ffn_gate_exps.weight", 2 * PAGE, X, 8, 256)   # 4096 bytes per expert
    g = SimpleNamespace(path="f", file_size=2 * PAGE + gate.nbytes + PAGE,
                        tensors={gate.name: gate, "blk.0.attn_q.weight": SimpleNamespace(
                            name="blk.0.attn_q.weight", ggml_type=GGMLType.F32, shape=(8,), offset=0, nbytes=32)})
    m = build_manifest(g)
    assert m.expert_windows(0) == ()                    # a dense layer beside a MoE one
    assert [(w.offset, w.nbytes, w.data_offset) for w in m.expert_windows(1)] == \
        [(2 * PAGE, PAGE, 0), (3 * PAGE, PAGE, 0), (4 * PAGE, PAGE, 0)]


def test_expert_windows_of_a_synthetic_moe_hold_each_experts_bytes(tmp_path):
    import numpy as np

    from aircupy.synth import synth_model
    path = synth_model(tmp_path / "q2.gguf", "tiny-qwen2moe", "Q8_0", seed=1).path
    raw = np.fromfile(path, np.uint8)
    with GGUFFile(path) as g:
        c, m = ModelConfig.from_gguf(g), build_manifest(g)
        for i in range(c.n_layers):
            ws = m.expert_windows(i)
            assert len(ws) == 3 * c.n_expert
            names = [w.tensor for w in m.expert_windows(i, 5)]
            assert names == sorted(names, key=lambda n: g.tensors[n].offset) and len(names) == 3
            for w in ws:
                info = g.tensors[w.tensor]
                X = info.shape[0]
                assert w.data_bytes * X == info.nbytes
                window = raw[w.offset:w.end]                # what a streamer reads
                piece = window[w.data_offset:w.data_offset + w.data_bytes]
                np.testing.assert_array_equal(piece, info.data[w.expert * w.data_bytes:(w.expert + 1) * w.data_bytes])
                assert m.layers[i].offset <= w.file_offset and w.file_offset + w.data_bytes <= m.layers[i].end
            # one expert's bytes: its gate, up and down slices
            assert m.expert_bytes(i) == sum(g.tensors[f"blk.{i}.ffn_{r}_exps.weight"].nbytes // c.n_expert
                                            for r in ("gate", "up", "down"))
        d = m.to_dict()
        assert len(d["expert_windows"]) == c.n_layers and d["expert_windows"][0][0]["ggml_type"] == "Q8_0"
