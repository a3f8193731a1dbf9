"""CPU tier: the kernels' packed weight layout (aircupy/cuda/ops/packing.py) and the kernel source list."""
from __future__ import annotations

import numpy as np
import pytest

from aircupy.cuda.kernels import SOURCES, source_dir
from aircupy.gguf.ggml import BLOCK_GEOMETRY, GGMLType, tensor_nbytes
from aircupy.cuda.ops.packing import HEADERS, QWeight, heads_offset, needs_repack, repack_nbytes, repack_numpy
from tests.helpers.quant_blocks import ALL_TYPES, random_blocks


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: GGMLType(t).name)
def test_repack_is_a_split_of_each_block(t):
    t = GGMLType(t)
    k = 512 if BLOCK_GEOMETRY[t][0] == 256 else 96
    raw = random_blocks(t, 3, k, np.random.default_rng(0)).reshape(-1)
    packed = repack_numpy(raw, t, (3, k))
    assert packed.size == repack_nbytes(t, (3, k))
    if not needs_repack(t):
        assert np.array_equal(packed, raw)
        return
    off, hb = HEADERS[t]
    bb = BLOCK_GEOMETRY[t][1]
    n = raw.size // bb
    h0 = heads_offset(t, (3, k))
    assert h0 % 16 == 0 and repack_nbytes(t, (3, k)) - tensor_nbytes(t, (3, k)) < 16
    bodies = packed[:n * (bb - hb)].reshape(n, bb - hb)
    heads = packed[h0:h0 + n * hb].reshape(n, hb)
    rebuilt = np.concatenate([bodies[:, :off], heads, bodies[:, off:]], axis=1).reshape(-1)
    assert np.array_equal(rebuilt, raw)


def test_bodies_are_aligned_for_vector_loads():
    for t, align in [(GGMLType.Q4_0, 16), (GGMLType.Q8_0, 16), (GGMLType.Q6_K, 16), (GGMLType.Q2_K, 16),
                     (GGMLType.Q5_0, 4), (GGMLType.Q3_K, 4)]:
        be, bb = BLOCK_GEOMETRY[t]
        assert (bb - HEADERS[t][1]) % align == 0, t.name


def test_qweight_checks_shape():
    with pytest.raises(ValueError):
        QWeight(np.zeros(10, np.uint8), GGMLType.Q4_0, (4, 48))
    with pytest.raises(ValueError):
        QWeight(np.zeros(10, np.uint8), GGMLType.IQ2_XS, (4, 256))
    assert QWeight(np.zeros(10, np.uint8), GGMLType.Q4_0, (1, 32)).nbytes == 18


def test_every_kernel_file_is_compiled():
    on_disk = {p.name for p in source_dir().glob("*.cu")}
    assert on_disk == set(SOURCES)
    assert (source_dir() / "common.cuh").exists()
