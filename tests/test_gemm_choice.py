"""CPU tier: the prefill path choice of linear() (aircupy/cuda/ops/gemm_choice.py), the kernel list of
cuda_src/gemm_q.cu against it, and gemm_q's argument checks (they run before any launch, so host numpy
arrays exercise them without a GPU)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from aircupy.cuda.kernels import SOURCES, source_dir
from aircupy.gguf.ggml import GGMLType
from aircupy.cuda.ops import matmul as mm
from aircupy.cuda.ops import gemm_choice as gc
from aircupy.cuda.ops.packing import QWeight


def test_m_buckets():
    assert [gc.m_bucket(m) for m in (1, 9, 32, 33, 128, 129, 512, 513, 2048, 2049, 10**6)] == \
        [32, 32, 32, 128, 128, 512, 512, 2048, 2048, 2048, 2048]
    with pytest.raises(ValueError):
        gc.m_bucket(0)


def test_empty_table_means_cublas_everywhere():
    """Above a batch's decode rows (SMALL_M) an empty table means cuBLAS; at or below it, split-K
    gemm_q for the types it has, cuBLAS for the others, and the environment's choice when set."""
    for t in ("Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16"):
        for m in (65, 512, 2048):
            assert gc.prefill_path(t, 4096, 4096, m, {}) == "cublas"
        want = "fused_sk" if t in gc.GEMM_Q_TYPES else "cublas"
        assert gc.prefill_path(t, 4096, 4096, 9, {}) == gc.prefill_path(t, 4096, 4096, 64, {}) == want


def test_small_m_path_from_the_environment(monkeypatch):
    monkeypatch.setenv(gc.SMALL_M_ENV, "cublas")
    assert gc.prefill_path("Q4_0", 4096, 4096, 32) == "cublas"
    with pytest.raises(TypeError):
        gc.FAST_PATHS[("Q4_0", 1, 32, 32)] = "fused"  # read-only: no module-level mutable state


def test_the_shipped_table_is_well_formed():
    """FAST_PATHS (empty until a GPU run measures a win; then pasted from bench_kernels --gemm) only
    names fused paths, supported weights and real buckets; everything else stays on cuBLAS."""
    for (t, n, k, b), p in gc.FAST_PATHS.items():
        assert p in gc.FUSED_PATHS and gc.gemm_q_supports(t, k) and b in gc.M_BUCKETS and n > 0
        assert gc.prefill_path(t, n, k, b) == p
    assert gc.prefill_path("Q6_K", 4096, 4096, 512) == "cublas"


def test_table_lookup_by_type_shape_and_bucket():
    table = {("Q4_0", 6144, 4096, 512): "fused", ("Q4_K", 4096, 14336, 2048): "fused_xh"}
    assert gc.prefill_path("Q4_0", 6144, 4096, 300, table) == "fused"   # bucket 512 holds 129..512
    assert gc.prefill_path("Q4_0", 6144, 4096, 100, table) == "cublas"  # bucket 128: not measured
    assert gc.prefill_path("Q4_0", 4096, 4096, 512, table) == "cublas"  # other N
    assert gc.prefill_path("Q8_0", 6144, 4096, 512, table) == "cublas"  # other type
    assert gc.prefill_path("Q4_K", 4096, 14336, 8192, table) == "fused_xh"  # past the last bound


def test_unsupported_types_never_take_the_fused_kernel():
    table = {("Q6_K", 4096, 4096, 512): "fused", ("F16", 4096, 4096, 512): "fused",
             ("Q4_K", 64, 576, 512): "fused"}
    assert gc.prefill_path("Q6_K", 4096, 4096, 512, table) == "cublas"
    assert gc.prefill_path("F16", 4096, 4096, 512, table) == "cublas"
    assert gc.prefill_path("Q4_K", 64, 576, 512, table) == "cublas"  # K % 256 != 0
    assert gc.gemm_q_supports("Q4_0", 96) and not gc.gemm_q_supports("Q4_K", 288)
    assert gc.gemm_q_supports("Q4_K", 768) and not gc.gemm_q_supports("Q6_K", 768)


def _row(t, n, k, m, cublas, fused, fused_xh):
    return dict(type=t, n=n, k=k, m=m, cublas_us=cublas, fused_us=fused, fused_xh_us=fused_xh)


def test_measured_table_needs_a_win_at_every_m_of_the_bucket():
    rows = [
        _row("Q4_0", 6144, 4096, 512, 100.0, 80.0, 85.0),    # both win, fused faster
        _row("Q4_0", 6144, 4096, 2048, 300.0, 299.0, 305.0),  # within the 3% margin: cuBLAS
        _row("Q8_0", 4096, 4096, 400, 60.0, 50.0, 55.0),      # fused wins at 400 ...
        _row("Q8_0", 4096, 4096, 512, 60.0, 70.0, 55.0),      # ... not at 512; fused_xh wins at both
        _row("Q4_K", 576, 1536, 300, 60.0, 70.0, 70.0),       # loses at 300 ...
        _row("Q4_K", 576, 1536, 500, 60.0, 10.0, 10.0),       # ... so bucket 512 stays cuBLAS
        _row("Q4_K", 4096, 14336, 2048, 20.0, 10.0, 12.0),
    ]
    got = gc.measured_table(rows)
    assert got == {("Q4_0", 6144, 4096, 512): "fused", ("Q8_0", 4096, 4096, 512): "fused_xh",
                   ("Q4_K", 4096, 14336, 2048): "fused"}
    assert list(got) == sorted(got)
    # the printed map is valid Python that yields the same table
    for table in (got, {}):
        ns: dict = {}
        exec(gc.format_table(table), {"Mapping": dict, "Key": tuple, "MappingProxyType": gc.MappingProxyType}, ns)
        assert dict(ns["FAST_PATHS"]) == table
        assert all(v in gc.FUSED_PATHS for v in ns["FAST_PATHS"].values())


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
    from aircupy.cuda.ops.packing import repack_nbytes
    return QWeight(np.zeros(repack_nbytes(t, (n, k)), np.uint8), t, (n, k))


@pytest.mark.parametrize("bad, exc", [
    (dict(x=np.zeros((3, 256), np.float64)), TypeError),
    (dict(x=np.zeros((3, 128), np.float32)), ValueError),
    (dict(out=np.zeros((3, 41), np.float32)), ValueError),
    (dict(out=np.zeros((41, 3), np.float32).T), ValueError),  # not C-contiguous
    (dict(bias=np.zeros(39, np.float32)), ValueError),
    (dict(half="fp8"), ValueError),
    (dict(x=np.zeros((3, 256), np.uint16)), TypeError),  # bf16 bits with half="f16"
    (dict(x=np.zeros((3, 256), np.float16), half="bf16"), TypeError),
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
    with pytest.raises(ValueError, match="scratch"):  # fused_xh casts x into the scratch
        mm.linear(None, np.zeros((9, 256), np.float32), w, np.zeros((9, 40), np.float32), path="fused_xh")


def test_a_saved_table_loads_back_and_the_env_file_replaces_the_shipped_map(tmp_path, monkeypatch):
    import importlib

    table = {("Q4_0", 4096, 4096, 512): "fused", ("Q4_K", 14336, 4096, 2048): "fused_xh"}
    path = tmp_path / "h200.json"
    gc.save_table(table, str(path), device="NVIDIA H200")
    assert gc.load_table(str(path)) == table
    monkeypatch.setenv(gc.TABLE_ENV, str(path))
    try:
        mod = importlib.reload(gc)
        assert dict(mod.FAST_PATHS) == table
        assert mod.prefill_path("Q4_0", 4096, 4096, 300) == "fused"
        assert mod.prefill_path("Q4_0", 4096, 4096, 100) == "cublas"
    finally:
        monkeypatch.delenv(gc.TABLE_ENV)
        importlib.reload(gc)
    assert gc.prefill_path("Q4_0", 4096, 4096, 300) == gc.FAST_PATHS.get(("Q4_0", 4096, 4096, 512), "cublas")


@pytest.mark.parametrize("row", [["Q6_K", 64, 256, 512, "fused"], ["Q4_0", 64, 256, 100, "fused"],
                                 ["Q4_0", 64, 256, 512, "cublas"], ["Q4_0", 64, 256, 512]])
def test_a_malformed_table_entry_is_an_error_naming_the_file(tmp_path, row):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"fast_paths": [row]}))
    with pytest.raises(ValueError, match="bad.json: bad gemm table entry"):
        gc.load_table(str(path))
