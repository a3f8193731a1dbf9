"""Staged weight load (aircupy/cuda/load.py), CPU tier: the read plan covers every tensor once, and
run_load through a real Stager + ReadAhead with the numpy sink writes, piece by piece, the bytes of an
independent recipe (repack_numpy of the stacked sources; vectors dequantized at their rows)."""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.config import ModelConfig
from aircupy.gguf.reader import GGUFFile
from aircupy.gguf.arch import tensor_map
from aircupy.stream.manifest import PAGE
from aircupy.stream.read_ahead import ReadAhead
from aircupy.stream.stager import Stager
from aircupy.cuda.layout import global_layout, layer_layout
from aircupy.cuda.load import plan_load, run_load
from aircupy.gguf.quants import dequantize
from aircupy.cuda.ops.packing import repack_numpy
from aircupy.synth import synth_model
from tests.helpers.host_sink import HostSink

TINY = dict(vocab=400, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)


def _layouts(g):
    c = ModelConfig.from_gguf(g)
    tm = tensor_map(c.arch, c.n_layers, g.tensors)
    return [global_layout(tm.globals, g.tensors)] + \
        [layer_layout(tm.layers[i], g.tensors, True) for i in range(c.n_layers)]


def _expected_piece(p, tensors) -> np.ndarray:
    """The bytes piece p must hold: stacked sources repacked as one tensor, or f32 values."""
    if not p.is_matrix:
        out = np.zeros(p.shape[0], np.float32)
        for n, row0 in p.sources:
            v = dequantize(tensors[n].data, tensors[n].ggml_type, tensors[n].shape).reshape(-1)
            out[row0:row0 + v.size] = v
        return out.view(np.uint8)
    raw = np.concatenate([np.asarray(tensors[n].data) for n, _ in p.sources])
    return repack_numpy(raw, p.ggml_type, p.shape)


def _load_and_check(path, chunk, n_buffers=3):
    with GGUFFile(path) as g:
        layouts = _layouts(g)
        plan = plan_load(layouts, g.tensors, g.file_size, chunk=chunk)
        blocks = [np.zeros(lay.nbytes, np.uint8) for lay in layouts]
        staging = max(g.tensors[n].nbytes for lay in layouts for p in lay.matrices()
                      for n, _ in p.sources)
        with ReadAhead(path, plan.ranges, ahead_bytes=4 * chunk, piece=chunk) as ra, \
                Stager(path, n_buffers=n_buffers, buffer_bytes=chunk, read_ahead=ra) as st:
            read = run_load(plan, st, HostSink(blocks, staging))
            assert st.stats.bytes_read == read == plan.bytes_read
        for lay, block in zip(layouts, blocks):
            for p in lay.pieces.values():
                want = _expected_piece(p, g.tensors)
                got = block[p.offset:p.offset + want.nbytes]
                assert np.array_equal(got, want), (p.role, p.sources)
        return plan, g.file_size


@pytest.mark.parametrize("preset,qtype", [("llama3-8b", "Q4_0"), ("qwen2-0.5b", "Q6_K"),
                                          ("gemma3-270m", "Q4_K"), ("qwen3-0.6b", "Q8_0")])
def test_staged_load_equals_fill_recipe_on_synthetic_models(tmp_path, preset, qtype):
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    rep = synth_model(tmp_path / "m.gguf", preset, qtype, n_layers=2, overrides=over, seed=7)
    # 2 pages per read: most tensors span several reads and most reads hold several tensors.
    plan, size = _load_and_check(rep.path, chunk=2 * PAGE)
    assert len(plan.reads) > 10
    assert all(r.offset % PAGE == 0 and 0 < r.nbytes <= 2 * PAGE for r in plan.reads)


def test_staged_load_of_smollm2(smollm2_path):
    plan, size = _load_and_check(smollm2_path, chunk=4 << 20, n_buffers=4)
    # Every tensor once: the reads cover the tensor data, nothing twice, not much more than the file.
    assert plan.bytes_read <= size
    ends = [r.offset + r.nbytes for r in plan.reads]
    assert all(e <= o for e, o in zip(ends, [r.offset for r in plan.reads[1:]]))


def test_plan_segments_tile_each_tensor_exactly(tmp_path):
    rep = synth_model(tmp_path / "m.gguf", "llama3-8b", "Q4_1", n_layers=2, overrides=TINY, seed=1)
    with GGUFFile(rep.path) as g:
        plan = plan_load(_layouts(g), g.tensors, g.file_size, chunk=PAGE)
        cover = {i: [] for i in range(len(plan.sources))}
        for r in plan.reads:
            for sg in r.segments:
                assert 0 <= sg.read_off and sg.read_off + sg.nbytes <= r.nbytes
                assert r.offset + sg.read_off == plan.sources[sg.source].offset + sg.src_off
                cover[sg.source].append((sg.src_off, sg.nbytes))
        for i, s in enumerate(plan.sources):
            offs = sorted(cover[i])
            assert offs[0][0] == 0 and sum(n for _, n in offs) == s.nbytes
            assert all(a + n == b for (a, n), (b, _) in zip(offs, offs[1:]))
        with pytest.raises(ValueError):
            plan_load(_layouts(g), g.tensors, g.file_size, chunk=PAGE + 1)
