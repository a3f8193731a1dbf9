"""GPU tier: the staged weight load (cuda/load.py) writes the pool bytes the per-tensor path
(tests/helpers/reference_fill.py) writes, and the models built on it give the logits of a model
whose weights were written by fill. Each case starts from a cold page cache (fsync +
POSIX_FADV_DONTNEED, as bench_cold.evict), so the ReadAhead thread and the Stager read the disk."""
from __future__ import annotations

import numpy as np
import pytest

from bench.bench_cold import evict

pytestmark = pytest.mark.gpu

TINY = dict(vocab=512, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
CASES = [("llama3-8b", "Q4_0", 2), ("qwen2-0.5b", "Q6_K", 2), ("qwen3-0.6b", "Q8_0", 2),
         ("gemma3-270m", "Q4_K", 6), ("llama3-8b", "Q4_1", 2)]


@pytest.fixture(scope="module")
def lib():
    from aircupy.cuda.kernels import KernelLibrary
    lib = KernelLibrary()
    lib.warmup()
    return lib


def _synth(tmp_path, preset, qtype, n_layers):
    from aircupy.synth import synth_model
    over = dict(TINY, sliding_window=8) if preset.startswith("gemma3") else TINY
    return synth_model(tmp_path / f"{preset}-{qtype}.gguf", preset, qtype, n_layers=n_layers,
                       overrides=over, seed=11, logit_std=8.0).path


def _layouts(g):
    from aircupy.config import ModelConfig
    from aircupy.gguf.arch import tensor_map
    from aircupy.cuda.layout import global_layout, layer_layout
    c = ModelConfig.from_gguf(g)
    tm = tensor_map(c.arch, c.n_layers, g.tensors)
    return c, [global_layout(tm.globals, g.tensors)] + \
        [layer_layout(tm.layers[i], g.tensors, True) for i in range(c.n_layers)]


def _both_paths(path, lib, chunk):
    """(blocks written by fill, blocks written by load_blocks, blocks of HostSink), all zeroed first."""
    import cupy as cp

    from aircupy.gguf.reader import GGUFFile
    from aircupy.stream.stager import Stager
    from aircupy.cuda.load import load_blocks, plan_load, run_load, start_read_ahead
    from tests.helpers.host_sink import HostSink
    from tests.helpers.reference_fill import fill
    with GGUFFile(path) as g:
        _, layouts = _layouts(g)
        big = max(g.tensors[n].nbytes for lay in layouts for p in lay.matrices() for n, _ in p.sources)
        stream = cp.cuda.Stream(non_blocking=True)
        old = [cp.zeros(lay.nbytes, cp.uint8) for lay in layouts]
        new = [cp.zeros(lay.nbytes, cp.uint8) for lay in layouts]
        staging = cp.zeros(big, cp.uint8)
        evict(path)
        for lay, b in zip(layouts, old):
            fill(lay, b, g.tensors, lib, staging, stream)
        plan = plan_load(layouts, g.tensors, g.file_size, chunk=chunk)
        evict(path)
        read = load_blocks(plan, g.path, new, staging, lib, stream,
                           start_read_ahead(g.path, plan.ranges), n_buffers=3)
        host = [np.zeros(lay.nbytes, np.uint8) for lay in layouts]
        with Stager(path, n_buffers=3, buffer_bytes=chunk) as st:
            run_load(plan, st, HostSink(host, big))
        assert read == plan.bytes_read <= g.file_size
        return [b.get() for b in old], [b.get() for b in new], host


@pytest.mark.parametrize("preset,qtype,n_layers", CASES)
def test_staged_load_writes_fills_bytes(tmp_path, lib, preset, qtype, n_layers):
    path = _synth(tmp_path, preset, qtype, n_layers)
    old, new, host = _both_paths(path, lib, chunk=8 << 10)   # tensors split over many reads
    for i, (a, b, h) in enumerate(zip(old, new, host)):
        assert np.array_equal(a, b), f"block {i}: staged load differs from fill"
        assert np.array_equal(h, b), f"block {i}: CudaSink differs from its numpy twin"


def test_staged_load_of_smollm2_writes_fills_bytes(smollm2_path, lib):
    old, new, _ = _both_paths(smollm2_path, lib, chunk=1 << 20)
    assert all(np.array_equal(a, b) for a, b in zip(old, new))


def _logits(model, ids, n_ctx):
    cache = model.new_cache(n_ctx)
    return model.forward(ids, np.arange(len(ids), dtype=np.int32), cache, all_logits=True)


@pytest.mark.parametrize("preset,qtype,n_layers", CASES[:2])
def test_models_on_the_staged_load_give_fills_logits(tmp_path, lib, preset, qtype, n_layers):
    """CudaModel (staged load, cold file) vs the same model with every weight block rewritten by
    fill: identical logits. The same model streamed (staged globals + 1 resident layer, ReadAhead and the
    reader-thread RAM tier on the cold file) gives the resident logits bit for bit."""
    import cupy as cp

    from aircupy.gguf.reader import GGUFFile
    from aircupy.cuda.model import CudaModel
    from aircupy.cuda.placement import CudaOptions
    from tests.helpers.reference_fill import fill
    path = _synth(tmp_path, preset, qtype, n_layers)
    ids = np.random.default_rng(3).integers(4, TINY["vocab"], 12).astype(np.int32)
    with GGUFFile(path) as g:
        c, layouts = _layouts(g)
        evict(path)
        m = CudaModel(g, c, 64, lib=lib, options=CudaOptions(use_graphs=False))
        assert m.bytes_read <= g.file_size
        staged = _logits(m, ids, 64)
        scratch = m.pool.array("scratch", m.pool.plan.regions["scratch"].nbytes, np.uint8)
        names = ["weights.globals"] + [f"weights.layer{i}" for i in range(c.n_layers)]
        for name, lay in zip(names, layouts):
            fill(lay, m.pool.array(name, lay.nbytes, np.uint8), g.tensors, lib, scratch, m.stream)
        cp.cuda.Device().synchronize()
        assert np.array_equal(staged, _logits(m, ids, 64))
        evict(path)
        s = CudaModel(g, c, 64, lib=lib, options=CudaOptions(n_resident=1, ram_tier_bytes=1 << 30))
        try:
            for _ in range(2):                           # the first pass reads, the second hits the tier
                assert np.array_equal(staged, _logits(s, ids, 64))
            assert s.stats()["streamed_layers"] == n_layers - 1
        finally:
            s.close()
