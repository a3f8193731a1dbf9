"""CPU tier: the prefill path choice of linear() (aircupy/ops/gemm_choice.py), the kernel list of
cuda_src/gemm_q.cu against it, and gemm_q's argument checks (they run before any launch, so host numpy
arrays exercise them without a GPU)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from aircupy.device.kernels import SOURCES, source_dir
from aircupy.gguf.ggml import GGMLType
from aircupy.ops import cuda_matmul as mm
from aircupy.ops import gemm_choice as gc
from aircupy.ops.packing import QWeight


def test_m_buckets():
    assert [gc.m_bucket(m) for m in (1, 9, 32, 33, 128, 129, 512, 513, 2048, 2049, 10**6)] == \
        [32, 32, 32, 128, 128, 512, 512, 2048, 2048, 2048, 2048]
    with pytest.raises(ValueError):
        gc.m_bucket(0)


def test_empty_table_means_cublas_everywhere():
    assert gc.FUSED_SHAPES == frozenset()  # until a GPU run measures a win: behaviour unchanged
    for t in ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16"):
        for m in (9, 512, 2048):
            assert gc.prefill_path(t, 4096, 4096, m) == "cublas"


def test_table_lookup_by_type_shape_and_bucket():
    table = {("Q4_0", 6144, 4096, 512), ("Q4_K", 4096, 14336, 2048)}
    assert gc.prefill_path("Q4_0", 6144, 4096, 300, table) == "fused"   # bucket 512 holds 129..512
    assert gc.prefill_path("Q4_0", 6144, 4096, 100, table) == "cublas"  # bucket 128: not measured
    assert gc.prefill_path("Q4_0", 4096, 4096, 512, table) == "cublas"  # other N
    assert gc.prefill_path("Q8_0", 6144, 4096, 512, table) == "cublas"  # other type
    assert gc.prefill_path("Q4_K", 4096, 14336, 8192, table) == "fused"  # past the last bound


def test_unsupported_types_never_take_the_fused_kernel():
    table = {("Q6_K", 4096, 4096, 512), ("F16", 4096, 4096, 512), ("Q4_K", 64, 576, 512)}
    assert gc.prefill_path("Q6_K", 4096, 4096, 512, table) == "cublas"
    assert gc.prefill_path("F16", 4096, 4096, 512, table) == "cublas"
    assert gc.prefill_path("Q4_K", 64, 576, 512, table) == "cublas"  # K % 256 != 0
    assert gc.gemm_q_supports("Q4_0", 96) and not gc.gemm_q_supports("Q4_K", 288)
    assert gc.gemm_q_supports("Q4_K", 768) and not gc.gemm_q_supports("Q6_K", 768)


def test_measured_entries_need_a_win_at_every_m_of_the_bucket():
    rows = [
        dict(type="Q4_0", n=6144, k=4096, m=512, fused_us=80.0, cublas_us=100.0),    # win
        dict(type="Q4_0", n=6144, k=4096, m=2048, fused_us=300.0, cublas_us=301.0),  # within margin
        dict(type="Q8_0", n=4096, k=4096, m=400, fused_us=50.0, cublas_us=60.0),     # win at 400 ...
        dict(type="Q8_0", n=4096, k=4096, m=512, fused_us=70.0, cublas_us=60.0),     # ... loss at 512
        dict(type="Q4_K", n=576, k=1536, m=2048, fused_us=10.0, cublas_us=20.0),     # win
    ]
    got = gc.measured_entries(rows)
    assert got == [("Q4_0", 6144, 4096, 512), ("Q4_K", 576, 1536, 2048)]
    # the printed table is valid Python that yields the same set
    ns: dict = {}
    exec(gc.format_entries(got), {}, ns)
    assert ns["FUSED_SHAPES"] == frozenset(got)
    ns = {}
    exec(gc.format_entries([]), {}, ns)
    assert ns["FUSED_SHAPES"] == frozenset()


def test_kernel_list_matches_the_supported_types():
    src = (source_dir() / "gemm_q.cu").read_text()
    assert "gemm_q.cu" in SOURCES
    body = src[src.index("#define FOR_EACH_GEMM_Q_FORMAT"):]
    body = body[:body.index("\n\n") if "\n\n" in body else len(body)]
    names = {n.upper() for n in re.findall(r"X\((\w+),", body)}
    assert names == set(gc.GEMM_Q_TYPES)
    for t in names:  # the launcher's kernel names use the same suffixes as the other kernel families
        assert mm.FORMATS[GGMLType[t]][0] == t.lower()


def test_gemm_q_geometry():
    assert mm.gemm_q_bm(9) == 64 and mm.gemm_q_bm(127) == 64 and mm.gemm_q_bm(128) == 128
    assert mm.gemm_q_smem_nbytes(64) == 2 * 192 * 72 * 2  # 55296 B: above 48 KiB, opt-in needed
    assert mm.gemm_q_smem_nbytes(128) <= 227 * 1024 - 1024 and mm.gemm_q_smem_nbytes(128) <= 163 * 1024


def _w(t=GGMLType.Q4_0, n=40, k=256):
    from aircupy.ops.packing import repack_nbytes
    return QWeight(np.zeros(repack_nbytes(t, (n, k)), np.uint8), t, (n, k))


@pytest.mark.parametrize("bad, exc", [
    (dict(x=np.zeros((3, 256), np.float64)), TypeError),
    (dict(x=np.zeros((3, 128), np.float32)), ValueError),
    (dict(out=np.zeros((3, 41), np.float32)), ValueError),
    (dict(out=np.zeros((41, 3), np.float32).T), ValueError),  # not C-contiguous
    (dict(bias=np.zeros(39, np.float32)), ValueError),
    (dict(half="fp8"), ValueError),
    (dict(w=_w(GGMLType.Q6_K)), ValueError),
    (dict(w=QWeight(np.zeros(16, np.uint8), GGMLType.Q4_K, (40, 288))), ValueError),  # K % 256
    (dict(x=np.zeros((0, 256), np.float32), out=np.zeros((0, 40), np.float32)), ValueError),
])
def test_gemm_q_rejects_bad_arguments_before_launching(bad, exc):
    args = dict(x=np.zeros((3, 256), np.float32), w=_w(), out=np.zeros((3, 40), np.float32), bias=None,
                half="f16")
    args.update(bad)
    if "w" in bad and "x" not in bad:
        args["x"] = np.zeros((3, args["w"].shape[1]), np.float32)
    with pytest.raises(exc):
        mm.gemm_q(None, args["x"], args["w"], args["out"], bias=args["bias"], half=args["half"])


def test_linear_rejects_unknown_path():
    w = _w()
    with pytest.raises(ValueError, match="path"):
        mm.linear(None, np.zeros((9, 256), np.float32), w, np.zeros((9, 40), np.float32), path="magic")
