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
