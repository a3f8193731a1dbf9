"""Which prefill matmul linear() runs for M > 8 rows, per shape: dequantize W into an fp16/bf16 scratch
+ cuBLAS GemmEx ("cublas"), or the tensor-core GEMM with the dequantization fused (cuda_src/gemm_q.cu)
reading x as fp32 ("fused") or after a cast_half of x into the scratch ("fused_xh": half the bytes of x,
which the kernel re-reads once per 128 output columns, for one small extra launch).

Pure Python (no numpy, no cupy): the CPU tier tests it. The choice is a lookup in FAST_PATHS, a
read-only map (type name, N, K, M bucket) -> path of the shapes where a fused path was MEASURED faster
on a GPU; every other shape takes cuBLAS. `python bench/bench_kernels.py --gemm` times all three and
prints the map to paste here (AIRCUPY_GEMM_TABLE names a file of another GPU's map).

M buckets: a shape's speed depends on M mostly through the number of row tiles and how long the K loop
runs, so rows are grouped by the smallest bound in M_BUCKETS that holds them; past the last bound the
last bucket stands for every larger M (prefill chunks are at most a few thousand rows).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from types import MappingProxyType

# Types gemm_q has kernels for: their 32-value items tile a row in order (legacy formats; Q4_K/Q5_K,
# whose items 2g and 2g+1 cover values [64g, 64g + 64) of a 256-value block). Q2_K/Q3_K/Q6_K items
# straddle 128 values, the float types need no dequantization: those always take cuBLAS.
# Keep in sync with FOR_EACH_GEMM_Q_FORMAT in cuda_src/gemm_q.cu (a CPU test checks it).
GEMM_Q_TYPES: frozenset[str] = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"})
_BLOCK = {"Q4_K": 256, "Q5_K": 256}  # values per block where not 32: K must be a multiple

M_BUCKETS: tuple[int, ...] = (32, 128, 512, 2048)

Key = tuple[str, int, int, int]  # (type name, N, K, M bucket)
# Shapes where a fused path beat dequant + cuBLAS by >= 3% at every M timed in the bucket, and which
# one, as `python bench/bench_kernels.py --gemm` measured them on the Hopper host (bench/RESULTS.md has
# the run): gemm_q (mma.sync) wins only where cuBLAS's tiles leave the SMs idle; cuBLAS wins elsewhere.
FAST_PATHS: Mapping[Key, str] = MappingProxyType({
    ('Q4_0', 28672, 4096, 128): 'fused_xh',
    ('Q4_1', 28672, 4096, 128): 'fused_xh',
    ('Q4_K', 28672, 4096, 128): 'fused_xh',
    ('Q8_0', 28672, 4096, 128): 'fused_xh',
})

FUSED_PATHS = ("fused", "fused_xh", "fused_sk")
PATHS = ("cublas",) + FUSED_PATHS
TABLE_ENV = "AIRCUPY_GEMM_TABLE"  # a JSON file from `bench_kernels.py --gemm --table-out`: this GPU's map
# A batch's decode rows (9 .. SMALL_M): gemm_q split over K reads each weight once per step, where the
# cuBLAS path writes and reads the whole weight in fp16 first (bench_batch measures the two: decode of
# 8-64 sequences on the 8B); SMALL_M_ENV = "cublas" restores it for that comparison.
SMALL_M = 64
SMALL_M_ENV = "AIRCUPY_SMALL_M_PATH"


def m_bucket(m: int) -> int:
    """The M bucket of m rows (m >= 1): the smallest bound >= m, the last bound beyond it."""
    if m < 1:
        raise ValueError(f"rows must be >= 1, got {m}")
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def gemm_q_supports(type_name: str, k: int) -> bool:
    """Whether gemm_q takes a weight of this type with rows of k values."""
    return type_name in GEMM_Q_TYPES and k % _BLOCK.get(type_name, 32) == 0


def prefill_path(type_name: str, n: int, k: int, m: int, table: Mapping[Key, str] | None = None) -> str:
    """The table's path (default FAST_PATHS) for (type, n, k, m_bucket(m)) where gemm_q supports the
    weight, else 'cublas'."""
    if not gemm_q_supports(type_name, k):
        return "cublas"
    if m <= SMALL_M:
        return os.environ.get(SMALL_M_ENV, "fused_sk")
    if table is None:
        table = FAST_PATHS
    return table.get((type_name, int(n), int(k), m_bucket(m)), "cublas")


def measured_table(rows: Iterable[Mapping], margin: float = 0.03) -> dict[Key, str]:
    """FAST_PATHS entries from bench rows {type, n, k, m, cublas_us, fused_us, fused_xh_us}: per key,
    the fused path with the least total time among those at least `margin` faster than cuBLAS at EVERY
    M measured in the bucket (no guessing between measurements); keys sorted for a stable diff."""
    groups: dict[Key, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((str(r["type"]), int(r["n"]), int(r["k"]), m_bucket(int(r["m"]))), []).append(r)
    out: dict[Key, str] = {}
    for key, rs in sorted(groups.items()):
        best = None
        for p in FUSED_PATHS:
            if all(f"{p}_us" in r and float(r[f"{p}_us"]) * (1.0 + margin) <= float(r["cublas_us"]) for r in rs):
                total = sum(float(r[f"{p}_us"]) for r in rs)
                if best is None or total < best[0]:
                    best = (total, p)
        if best is not None:
            out[key] = best[1]
    return out


def format_table(table: Mapping[Key, str]) -> str:
    """The FAST_PATHS assignment for this map, as Python source to paste into this module."""
    items = "".join(f"    {tuple(k)!r}: {v!r},\n" for k, v in sorted(table.items()))
    return "FAST_PATHS: Mapping[Key, str] = MappingProxyType({" + (f"\n{items}" if items else "") + "})"


def save_table(table: Mapping[Key, str], path: str, device: str = "") -> None:
    """Write a measured map as JSON ({"device", "fast_paths": [[type, n, k, m_bucket, path], ...]}), the
    file AIRCUPY_GEMM_TABLE names to use it in place of the shipped FAST_PATHS (a per-GPU tuning)."""
    rows = [[k[0], int(k[1]), int(k[2]), int(k[3]), v] for k, v in sorted(table.items())]
    with open(path, "w") as f:
        json.dump({"device": device, "fast_paths": rows}, f, indent=1)


def load_table(path: str) -> dict[Key, str]:
    """The map in a save_table file; ValueError naming the file on a malformed entry."""
    with open(path) as f:
        doc = json.load(f)
    out: dict[Key, str] = {}
    for row in doc.get("fast_paths", []) if isinstance(doc, dict) else [None]:
        ok = (isinstance(row, list) and len(row) == 5 and row[0] in GEMM_Q_TYPES and row[4] in FUSED_PATHS
              and all(isinstance(v, int) and v > 0 for v in row[1:4]) and row[3] in M_BUCKETS)
        if not ok:
            raise ValueError(f"{path}: bad gemm table entry {row!r} (want [type, n, k, m_bucket, "
                             f"one of {FUSED_PATHS}], type in {sorted(GEMM_Q_TYPES)}, m_bucket in {M_BUCKETS})")
        out[(row[0], row[1], row[2], row[3])] = row[4]
    return out


if os.environ.get(TABLE_ENV):  # this GPU's measured map replaces the shipped one
    FAST_PATHS = MappingProxyType(load_table(os.environ[TABLE_ENV]))
